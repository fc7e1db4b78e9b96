"""The decode step's streamed weight matmuls, [16, K] x [K, N], by the kernel's layout.

One pass is 72 matmuls: the T5-small decoder's fused q|k|v, self o, cross q, cross o,
gated wi_0|wi_1 and wo, for 6 layers x 2 models, each with its own weights, so they
stream from memory as in the sampler's step; each model is its own chain of 36, as in
the step. One call runs 16 passes inside a compiled loop; each arm is the median
[min-max] of --rounds interleaved rounds, and the ratio to [K,N] is taken within each
round.

  [K,N]            the kernels as stored: x @ W
  [N,K]            the kernels stored transposed, contracting their minor dimension (what
                   the sampler's steps read: t5.step_params)
  [K,N], .T in loop   the stored kernels transposed inside the loop body (XLA folds the
                   transpose into the dot: it is [K,N] again)
  [N,K], models stacked   both models' kernels stacked, one batched dot per pair

    python scripts/bench_kernel_layout.py [--rounds 5]
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

ROWS, D_MODEL, PASSES, MODELS = 16, 512, 16, 2
LAYER = ((512, 1536), (512, 512), (512, 512), (512, 512), (512, 2048), (1024, 512))
LAYERS = 6
CONTRACT_MINOR = (((1,), (1,)), ((), ()))
STACKED_MINOR = (((2,), (2,)), ((0,), (0,)))  # [M, R, K] x [M, N, K] -> [M, R, N]


def widen(x, k: int):
  """x [..., D_MODEL] tiled to k features (the 1024-wide wo input)."""
  return jnp.tile(x, (1,) * (x.ndim - 1) + (k // D_MODEL,))[..., :k]


def chain(x, kernels, minor: bool):
  """One model's step: x [ROWS, D_MODEL] through its kernels ([K, N], or [N, K])."""
  acc = jnp.zeros((ROWS,), jnp.float32)
  for w in kernels:
    xin = widen(x, w.shape[1] if minor else w.shape[0])
    y = jax.lax.dot_general(xin, w, CONTRACT_MINOR) if minor else xin @ w
    acc = acc + y[:, 0]
    x = x + 1e-3 * y[:, :D_MODEL]
  return acc


def stacked_chain(x, kernels):
  """Both models at once: kernels [MODELS, N, K], one batched dot each."""
  xs = jnp.stack([x + m for m in range(MODELS)])
  acc = jnp.zeros((MODELS, ROWS), jnp.float32)
  for w in kernels:
    y = jax.lax.dot_general(widen(xs, w.shape[2]), w, STACKED_MINOR)
    acc = acc + y[..., 0]
    xs = xs + 1e-3 * y[..., :D_MODEL]
  return acc.sum(0)


def one_pass(x, models, layout: str):
  if layout == "stacked":
    return stacked_chain(x, models)
  minor = layout == "minor"
  return sum(chain(x + m, ks, minor) for m, ks in enumerate(models))


def looped(kernels_fn, layout: str):
  @jax.jit
  def run(x, kernels):
    body = lambda i, a: a + one_pass(x + i, kernels_fn(kernels), layout)
    return jax.lax.fori_loop(0, PASSES, body, jnp.zeros((ROWS,), jnp.float32))
  return run


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  kn = [[jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02) for s in LAYER * LAYERS]
        for _ in range(MODELS)]
  nk = [[jnp.asarray(np.asarray(w).T.copy()) for w in ks] for ks in kn]
  stacked = [jnp.stack(ws) for ws in zip(*nk)]
  x = jnp.asarray(rng.standard_normal((ROWS, D_MODEL)).astype(np.float32))
  transpose = lambda models: [[w.T for w in ks] for ks in models]
  arms = {"[K,N]": (looped(lambda ks: ks, "stored"), kn),
          "[N,K]": (looped(lambda ks: ks, "minor"), nk),
          "[K,N], .T in loop": (looped(transpose, "minor"), kn),
          "[N,K], models stacked": (looped(lambda ks: ks, "stacked"), stacked)}
  outs = {name: np.asarray(fn(x, ks)) for name, (fn, ks) in arms.items()}
  ref = outs["[K,N]"]
  for name, out in outs.items():  # the same products, summed in another order
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert err < 1e-4, f"{name} differs from [K,N] by {err:.1e} of its largest value"
  times = profiling.interleaved_rounds(
      {name: (lambda fn=fn, ks=ks: fn(x, ks).block_until_ready())
       for name, (fn, ks) in arms.items()}, args.rounds)
  print(f"\n{MODELS * len(kn[0])} streamed matmuls at {ROWS} rows, {PASSES} passes per call, "
        f"{args.rounds} rounds\n")
  print("| kernels | ms per pass, median [min-max] | ÷ [K,N] (per round) |\n|---|---:|---:|")
  for name, ts in times.items():
    sp = profiling.spread([t / PASSES * 1e3 for t in ts])
    ratio = profiling.spread([t / r for t, r in zip(ts, times["[K,N]"])])
    print(f"| {name} | {sp['median']:.2f} [{sp['min']:.2f}-{sp['max']:.2f}] | "
          f"{ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}] |")


if __name__ == "__main__":
  main()
