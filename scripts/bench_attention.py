"""The decode step's attention against XLA's own read of the same bytes.

One pass is a DeRa decode step's attention: 2 models x 6 layers, each a self-attention
over its 64-position cache and a cross-attention over the 128-token prompt, each over
its own keys and values ([B, H, len, K], B 16, H 8, K 64: 144 MiB), so they stream from
memory as in the sampler's step. One call runs 16 passes inside a compiled loop; each
arm is the median [min-max] of --rounds interleaved rounds.

  as the step computes it   einsum scores and weighted sum, as t5's attention does
                            (here without its Q = 1 axis and position bias)
  keys [B,H,K,S], reduce    keys stored transposed, scores and sum as multiply + reduce
  read K/V once (reduce)    no attention: one fused reduction over the same K/V, the
                            least XLA:CPU's own fused ops take to read those bytes here

The floor is the bytes at the streaming-read probe's rate (profiling.Probes, one large
reduction), as in bench_sampler's roofline.

    python scripts/bench_attention.py [--rounds 5] [--small]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deranj import profiling  # noqa: E402

PASSES = 16
FULL = dict(batch=16, heads=8, d_kv=64, prompt=128, cache=64, layers=12)  # 2 models x 6
SMALL = dict(batch=2, heads=2, d_kv=8, prompt=16, cache=8, layers=2)


def scores_einsum(q, k):
  """q [B, H, K], k [B, H, S, K] -> [B, H, S]."""
  return jnp.einsum("bhk,bhsk->bhs", q, k)


def scores_reduce_t(q, k_t):
  """q [B, H, K], k_t [B, H, K, S] -> [B, H, S]: a reduction over a major axis."""
  return jnp.sum(q[..., None] * k_t, axis=2)


def weighted_einsum(w, v):
  return jnp.einsum("bhs,bhsk->bhk", w, v)


def weighted_reduce(w, v):
  return jnp.sum(w[..., None] * v, axis=2)


ARMS = {"as the step computes it": (scores_einsum, weighted_einsum, False),
        "keys [B,H,K,S], reduce": (scores_reduce_t, weighted_reduce, True)}


def attention_pass(q, tensors, scores, weighted):
  """Every layer's self and cross attention; `tensors` (k, v) pairs; q [B, H, K]."""
  for k, v in tensors:
    w = jax.nn.softmax(scores(q, k), axis=-1)
    q = q + 1e-3 * weighted(w, v)  # the next layer's query depends on this one
  return q


def read_pass(q, tensors):
  """The same keys and values, each read once by a fused reduction."""
  for k, v in tensors:
    q = q + 1e-3 * (jnp.sum(k * q[..., :1, None], axis=(2, 3))[..., None]
                    + jnp.sum(v, axis=2))
  return q


def looped(pass_fn):
  @jax.jit
  def run(q, tensors):
    body = lambda i, acc: acc + pass_fn(q + 1e-3 * i.astype(q.dtype), tensors)
    return jax.lax.fori_loop(0, PASSES, body, jnp.zeros_like(q))
  return run


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--small", action="store_true", help="tiny shapes, to try the script")
  args = parser.parse_args(argv)
  s = SMALL if args.small else FULL
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  b, h, d = s["batch"], s["heads"], s["d_kv"]
  kv = [(normal(b, h, length, d), normal(b, h, length, d))
        for _ in range(s["layers"]) for length in (s["cache"], s["prompt"])]
  stored = [(jnp.asarray(k), jnp.asarray(v)) for k, v in kv]
  keys_t = [(jnp.asarray(np.swapaxes(k, 2, 3).copy()), jnp.asarray(v)) for k, v in kv]
  nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
  q = jnp.asarray(normal(b, h, d))
  arms = {name: (looped(lambda q, t, sc=sc, we=we: attention_pass(q, t, sc, we)),
                 keys_t if transposed else stored)
          for name, (sc, we, transposed) in ARMS.items()}
  arms["read K/V once (reduce)"] = (looped(read_pass), stored)
  outs = {name: np.asarray(fn(q, t)) for name, (fn, t) in arms.items()}
  ref = outs["as the step computes it"]
  for name in ARMS:  # the same attention, summed in another order
    err = np.max(np.abs(outs[name] - ref)) / np.max(np.abs(ref))
    assert err < 1e-5, f"{name} differs from the step's attention by {err:.1e}"
  probes = profiling.Probes({}, megabytes=64 if args.small else 512)
  reads = []

  def probe():
    reads.append(probes.measure()["read"])

  calls = {name: (lambda fn=fn, t=t: fn(q, t).block_until_ready()) for name, (fn, t) in arms.items()}
  times = profiling.interleaved_rounds({**calls, "probe": probe}, args.rounds)
  read = profiling.spread(reads)["median"]
  floor_ms = nbytes / read * 1e3
  print(f"\non {profiling.cpu_description()}, {os.cpu_count()} cores")
  print(f"{len(kv)} attentions per pass ({nbytes / 2**20:.1f} MiB of keys and values), "
        f"{PASSES} passes per call, {args.rounds} rounds; streaming read "
        f"{read / 1e9:.1f} GB/s [{min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f}]\n")
  print("| arm | ms per pass, median [min-max] | GB/s | ÷ floor | ÷ read K/V once (per round) |")
  print("|---|---:|---:|---:|---:|")
  for name in arms:
    ms = profiling.spread([t / PASSES * 1e3 for t in times[name]])
    ratio = profiling.spread([t / r for t, r in zip(times[name], times["read K/V once (reduce)"])])
    print(f"| {name} | {ms['median']:.2f} [{ms['min']:.2f}-{ms['max']:.2f}] | "
          f"{nbytes / ms['median'] / 1e6:.1f} | {ms['median'] / floor_ms:.2f} | "
          f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}] |")
  print(f"| floor (bytes ÷ streaming read) | {floor_ms:.2f} | {read / 1e9:.1f} | 1.00 | |")


if __name__ == "__main__":
  main()
