"""SFT train-step throughput: deranj's trainer step against transformers + torch AdamW.

Both train T5-small (T5 1.0: vocab 32128, d_model 512, d_kv 64, d_ff 2048, 8 heads, 6+6
layers, ReLU, tied and scaled output head) from the same random weights on the same
batch (default 8 x 256 input tokens, 64 target tokens, no padding), float32, dropout
0.1 in both (--dropout), loss = mean token cross-entropy over non-PAD targets (no
z-loss), AdamW at a constant 1e-4 without clipping, on this machine's CPU in one run.

  ours     jax.jit(partial(SFT(build_model(cfg, z_loss=0.0)).train_step,
           optimizer=make_optimizer(constant 1e-4, name='adamw', clip_norm=None)),
           donate_argnums=0), as deranj/training/trainer.py builds it
  PyTorch  T5ForConditionalGeneration(labels=...).loss.backward(); AdamW.step();
           zero_grad(), torch.set_num_threads(cores)

After a warm-up, rounds alternate the order (ours, PyTorch | PyTorch, ours) and each
ends with a GEMM, so load from other processes falls on all alike; the table reports
medians over rounds, and CPU seconds per step. Under heavy load PyTorch's OpenMP threads
(spinning at every op's barrier) slow down far more than XLA's (seen here: 25 s vs 5.7 s
a step, a 4.4x "ratio" that is 1.17x on the idle machine): trust a run whose median GEMM
is near its max; the script says when it is not.

FLOPs are counted analytically (matmuls only; a multiply-add = 2 FLOPs), per step:
  train = 3 x forward (backward = 2 x forward), forward = 2 x MACs, MACs =
      B*S * Le * (4*D*H*K + 2*D*F + 2*S*H*K)                 encoder layers
    + B*T * Ld * (6*D*H*K + 2*D*F + 2*T*H*K + 2*S*H*K)       decoder self+cross+MLP
    + B*S * Ld * 2*D*H*K                                     cross-attention keys/values
    + B*T * D*V                                              output head
(= 6 x params x tokens for the weight matmuls, plus attention scores and contexts; the
causal T x T scores are counted in full, as both compute them in full). XLA's own
count (compiled cost_analysis, all ops) is printed beside it. The machine's limit is
the float32 GEMM rate (2048^3 matmul, the better of jax and torch) measured in every
round of the same run.

    PYTHONPATH=. python scripts/bench_train.py [--batch 8 --inputs_len 256 \
        --targets_len 64 --steps 10 --dropout 0.1]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from deranj import profiling  # noqa: E402
from deranj.models import build  # noqa: E402
from deranj.models import hf  # noqa: E402
from deranj.training import objectives  # noqa: E402
from deranj.training import optimizers  # noqa: E402

T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6,
                num_decoder_layers=6, feed_forward_proj="relu", tie_word_embeddings=True)
LEARNING_RATE = 1e-4


def train_flops(cfg: build.T5Config, b: int, s: int, t: int) -> float:
  """Matmul FLOPs of one forward + backward pass (the formula in the module docstring)."""
  d, hk, f, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
  le, ld = cfg.num_layers, cfg.decoder_layers
  macs = (b * s * le * (4 * d * hk + 2 * d * f + 2 * s * hk)
          + b * t * ld * (6 * d * hk + 2 * d * f + 2 * t * hk + 2 * s * hk)
          + b * s * ld * 2 * d * hk
          + b * t * d * v)
  return 3 * 2 * macs


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def gemm_timers(n: int = 2048):
  """Callables that each run one n x n x n float32 matmul (jax, torch), and its FLOPs."""
  import torch
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  aj, at = jnp.asarray(a), torch.from_numpy(a)
  mm = jax.jit(jnp.matmul)
  mm(aj, aj).block_until_ready()
  torch.mm(at, at)
  return {"jax": lambda: mm(aj, aj).block_until_ready(), "torch": lambda: torch.mm(at, at)}, 2.0 * n**3


def make_batch(vocab: int, b: int, s: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A model batch of full-length random rows; prompts and responses end in EOS (1)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab, size=(b, s)).astype(np.int32)
  targets = rng.integers(2, vocab, size=(b, t)).astype(np.int32)
  inputs[:, -1] = targets[:, -1] = 1
  return {"prompts": inputs, "responses": targets}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs_len", type=int, default=256)
  parser.add_argument("--targets_len", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10, help="rounds: one timed step of each")
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--small", action="store_true", help="a tiny shape, to try the script")
  args = parser.parse_args()

  import torch
  import transformers
  cores = os.cpu_count() or 1
  torch.set_num_threads(cores)
  shape = dict(T5_SMALL)
  if args.small:
    shape.update(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2,
                 num_decoder_layers=2)
  b, s, t = args.batch, args.inputs_len, args.targets_len

  # Same random weights in both: transformers initialises, deranj loads its safetensors.
  torch.manual_seed(0)
  pt_model = transformers.T5ForConditionalGeneration(transformers.T5Config(
      dropout_rate=args.dropout, decoder_start_token_id=0, pad_token_id=0, **shape))
  with tempfile.TemporaryDirectory() as tmp:
    pt_model.save_pretrained(tmp)
    loaded_cfg, params = hf.load_t5(tmp, dropout_rate=args.dropout)
  cfg = build.T5Config(dropout_rate=args.dropout, **shape)
  assert loaded_cfg == cfg, (loaded_cfg, cfg)

  # Ours: the trainer's step, built as deranj/training/trainer.py builds it.
  objective = objectives.SFT(build.build_model(cfg, z_loss=0.0))
  optimizer = optimizers.make_optimizer(optax.constant_schedule(LEARNING_RATE), name="adamw",
                                        clip_norm=None)
  state = objectives.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=jax.jit(optimizer.init)(params))
  step_fn = jax.jit(functools.partial(objective.train_step, optimizer=optimizer),
                    donate_argnums=0)
  batch_np = make_batch(cfg.vocab_size, b, s, t)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  rng = jax.random.PRNGKey(0)

  # PyTorch: labels are the responses (-100 would mark PAD; there is none here); the
  # model shifts them right into its decoder inputs, starting with
  # decoder_start_token_id = 0, as deranj's wrapper does.
  pt_model.train()
  pt_opt = torch.optim.AdamW(pt_model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                             eps=1e-8, weight_decay=0.0)
  prompts = torch.from_numpy(batch_np["prompts"]).long()
  pt_inputs = dict(input_ids=prompts, attention_mask=prompts != 0,
                   labels=torch.from_numpy(batch_np["responses"]).long())

  # Same starting loss (dropout off): the two compute the same function.
  ours_loss0 = float(jax.jit(objective.model.loss_fn)(params, batch)[0])
  pt_model.eval()
  with torch.no_grad():
    pt_loss0 = float(pt_model(**pt_inputs).loss)
  pt_model.train()

  print(f"bench_train: batch {b}, inputs {s}, targets {t}, dropout {args.dropout}, float32, "
        f"{jax.devices()[0].platform} x{cores} cores, jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}")
  print(f"initial loss without dropout: ours {ours_loss0:.5f}, PyTorch {pt_loss0:.5f}")

  step_count = [0]

  def ours_step():
    nonlocal state
    state, metrics = step_fn(state, {}, batch, jax.random.fold_in(rng, step_count[0]))
    step_count[0] += 1
    jax.block_until_ready((state, metrics))

  def pt_step():
    loss = pt_model(**pt_inputs).loss
    loss.backward()
    pt_opt.step()
    pt_opt.zero_grad()

  start = time.perf_counter()
  compiled = step_fn.lower(state, {}, batch, rng).compile()
  compile_s = time.perf_counter() - start
  xla_flops = profiling.compiled_cost(compiled)["flops"]
  for _ in range(2):  # warm-up: the first call also places the state; torch allocates
    ours_step()
    pt_step()

  gemm, gemm_flops = gemm_timers()
  # Load from other processes comes and goes: each round runs both steps (in alternating
  # order) and a GEMM of each library, so every median below sees the same conditions.
  times = {"ours": [], "pt": []}
  cpu = {"ours": [], "pt": []}
  gemm_rate = []
  for i in range(args.steps):
    order = [("ours", ours_step), ("pt", pt_step)]
    for name, fn in order if i % 2 == 0 else order[::-1]:
      wall, used = _timed(fn)
      times[name].append(wall)
      cpu[name].append(used)
    gemm_rate.append(max(gemm_flops / _timed(fn)[0] for fn in gemm.values()))

  flops = train_flops(cfg, b, s, t)
  tokens = b * t
  ours_s, pt_s = statistics.median(times["ours"]), statistics.median(times["pt"])
  gemm_med = statistics.median(gemm_rate)

  print(f"compile {compile_s:.1f} s; FLOPs/step analytic {flops / 1e9:.1f} G, "
        f"XLA cost_analysis {xla_flops / 1e9:.1f} G")
  print(f"GEMM 2048^3 float32 (best of jax, torch per round): median {gemm_med / 1e9:.0f}, "
        f"max {max(gemm_rate) / 1e9:.0f} GFLOP/s\n")
  print(f"| median of {args.steps} rounds | step (s) | target tokens/s | GFLOP/s "
        f"| of GEMM ({gemm_med / 1e9:.0f} GFLOP/s) | CPU s/step |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, key in (("deranj train_step (jit)", "ours"), ("PyTorch T5 + AdamW", "pt")):
    seconds = statistics.median(times[key])
    print(f"| {name} | {seconds:.3f} | {tokens / seconds:.0f} | {flops / seconds / 1e9:.1f} "
          f"| {flops / seconds / gemm_med:.0%} | {statistics.median(cpu[key]):.2f} |")
  print(f"| ratio ours / PyTorch | | {pt_s / ours_s:.2f}x | | | |")
  if gemm_med < 0.8 * max(gemm_rate):
    print(f"\nNOTE: the machine was loaded (median GEMM {gemm_med / max(gemm_rate):.0%} of its "
          "max); PyTorch suffers more from load than XLA, so the ratio overstates ours.")
  print(f"\nper round, s: ours {[round(x, 2) for x in times['ours']]}\n"
        f"              PyTorch {[round(x, 2) for x in times['pt']]}\n"
        f"GEMM GFLOP/s {[round(x / 1e9) for x in gemm_rate]}")

if __name__ == "__main__":
  main()
