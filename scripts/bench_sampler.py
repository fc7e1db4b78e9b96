"""DeRa sampling throughput: deranj against transformers `generate`, and the memory floor.

Same random weights in both (T5-small shape by default: d_model 512, 6+6 layers, 8 heads,
d_ff 1024 gated-GELU, vocab 32128), batch 16, 128-token prompts, 64 new tokens forced
(EOS never ends a row), float32, this machine's CPU.

Rows:
  1. deranj DeRa (two KV-cached models in one compiled while_loop)
  2. transformers `generate` with a DeRa logits processor written as the official demo
     does it (the reference model runs inside the processor with its own KV cache)
  3. deranj, reference model only;  4. deranj, aligned model only
  5. a 6-value lam sweep: one batched deranj call vs 6 separate transformers runs

The floor: decoding is memory-bound at this batch, so each step must at least stream
both decoders' weights and the output head once; floor = bytes x steps / bandwidth,
with the bandwidth of a large on-device copy (read + write) measured in this run.

    python scripts/bench_sampler.py [--batch 16 --prompt_len 128 --new_tokens 64]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deranj import decoding  # noqa: E402
from deranj import dera  # noqa: E402
from deranj import profiling  # noqa: E402
from deranj.models import base  # noqa: E402
from deranj.models import hf  # noqa: E402
from deranj.models import t5  # noqa: E402

LAMS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
NEVER = -1  # an EOS id no token equals: every row decodes all new tokens


def _best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
  """Bytes/s of a large on-device copy (each byte read once and written once)."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  copy(x).block_until_ready()
  seconds = _best_of(lambda: copy(x).block_until_ready(), repeats)
  return 2 * x.nbytes / seconds


def streamed_bytes(params) -> int:
  """Decoder weights a decode step must read: all but the cached cross-attention k/v,
  plus the output head (the embedding when tied)."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params["decoder"]):
    names = [getattr(p, "key", "") for p in path]
    if "encoder_decoder_attention" in names and ("key" in names or "value" in names):
      continue
    total += leaf.nbytes
  if "logits_dense" not in params["decoder"]:
    total += params["token_embedder"]["embedding"].nbytes
  return total


def hf_models(config_kwargs, directory):
  import torch
  import transformers
  models = []
  for seed in (0, 1):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(dropout_rate=0.0, decoder_start_token_id=0, **config_kwargs)).eval()
    path = os.path.join(directory, f"model{seed}")
    model.save_pretrained(path)
    models.append((model, path))
  return models


def make_dera_processor(ref_model, lam: float, encoder_input_ids, attention_mask):
  """The official demo's design: a LogitsProcessor that runs the reference model with its
  own KV cache on each new token and mixes its logits into the aligned model's scores."""
  import torch
  import transformers

  class DeRaLogitsProcessor(transformers.LogitsProcessor):

    def __init__(self):
      self.past = None
      self.encoder_outputs = None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
      if self.encoder_outputs is None:
        self.encoder_outputs = ref_model.get_encoder()(
            input_ids=encoder_input_ids, attention_mask=attention_mask)
        new = input_ids
      else:
        new = input_ids[:, -1:]
      out = ref_model(encoder_outputs=self.encoder_outputs, attention_mask=attention_mask,
                      decoder_input_ids=new, cache=self.past, use_cache=True)
      self.past = out.cache
      mixed = lam * scores + (1 - lam) * out.logits[:, -1, :]
      # Keep what earlier processors masked (min_new_tokens sets EOS to -inf; 0 * -inf = nan).
      return torch.where(torch.isinf(scores), scores, mixed)

  return DeRaLogitsProcessor()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--small", action="store_true", help="a tiny shape, to try the script")
  args = parser.parse_args()

  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  shape = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=8, num_layers=6,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  if args.small:
    shape.update(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2)
  b, s, n = args.batch, args.prompt_len, args.new_tokens

  with tempfile.TemporaryDirectory() as tmp:
    (ref_hf, ref_dir), (al_hf, al_dir) = hf_models(shape, tmp)
    ref_cfg, ref_p = hf.load_t5(ref_dir, dropout_rate=0.0)
    al_cfg, al_p = hf.load_t5(al_dir, dropout_rate=0.0)
  ref = base.EncoderDecoderModel(t5.Transformer(ref_cfg))
  al = base.EncoderDecoderModel(t5.Transformer(al_cfg))
  prompts = np.random.default_rng(0).integers(2, shape["vocab_size"], size=(b, s))
  prompts[:, -1] = 1
  prompts_j = jnp.asarray(prompts, jnp.int32)
  rng = jax.random.PRNGKey(0)
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=n, eos_id=NEVER)

  def ours_dera():
    realigner.sample(prompts_j, 0.5, rng).tokens.block_until_ready()

  prefill_fn = jax.jit(lambda params, x: decoding.init_caches((ref, al), params, x, n))

  def ours_prefill():  # both encoders + cross-attention keys/values, once per prompt batch
    jax.block_until_ready(prefill_fn((ref_p, al_p), prompts_j))

  def ours_single(model, params):
    return lambda: decoding.sample(model, params, prompts_j, rng, max_decode_len=n,
                                   eos_id=NEVER).tokens.block_until_ready()

  sweep_lams = np.tile(np.asarray(LAMS, np.float32), b)  # one lam per output row

  def ours_sweep():  # each prompt encoded once, decoded at every lam
    realigner.sample(prompts_j, sweep_lams, rng, num_decodes=len(LAMS)).tokens.block_until_ready()

  enc = torch.tensor(prompts)
  mask = enc != 0

  def hf_dera(lam):
    def run():
      torch.manual_seed(0)
      with torch.no_grad():
        out = al_hf.generate(
            input_ids=enc, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
            max_new_tokens=n, min_new_tokens=n,
            logits_processor=transformers_list(make_dera_processor(ref_hf, lam, enc, mask)))
      assert out.shape[1] == n + 1, out.shape
    return run

  results = {}
  print(f"bench_sampler: batch {b}, prompt {s}, {n} new tokens, float32, "
        f"{jax.devices()[0].platform} x{os.cpu_count()} cores")
  with profiling.count_compiles("_sample_logit_mixed") as warm_compiles:
    ours_dera()  # compile
  for name, fn in [("deranj DeRa", ours_dera), ("deranj DeRa prefill (part of DeRa)", ours_prefill),
                   ("deranj ref only", ours_single(ref, ref_p)),
                   ("deranj aligned only", ours_single(al, al_p))]:
    fn()
    results[name] = _best_of(fn, args.repeats)
  hf_dera(0.5)()  # warm-up
  results["HF generate + DeRa processor"] = _best_of(hf_dera(0.5), args.repeats)
  with profiling.count_compiles("_sample_logit_mixed") as sweep_compiles:
    start = time.perf_counter()
    ours_sweep()
    sweep_cold = time.perf_counter() - start
  results["deranj 6-lam sweep (1 call)"] = _best_of(ours_sweep, args.repeats)
  with profiling.count_compiles("_sample_logit_mixed") as scalar_compiles:
    for lam in LAMS:
      realigner.sample(prompts_j, lam, rng).tokens.block_until_ready()
  hf_sweep = sum(_best_of(hf_dera(lam), 1) for lam in LAMS)
  results["HF 6 separate runs"] = hf_sweep

  bandwidth = measure_bandwidth()
  floor_bytes = streamed_bytes(ref_p) + streamed_bytes(al_p)
  floor = floor_bytes * n / bandwidth

  tokens = b * n
  print(f"\nmemory bandwidth (copy, read+write): {bandwidth / 1e9:.1f} GB/s; "
        f"bytes per step (both decoders + heads): {floor_bytes / 2**20:.0f} MiB; "
        f"floor for {n} steps: {floor * 1e3:.0f} ms\n")
  print(f"| {'run':36s} | {'time (s)':>8s} | {'tokens/s':>9s} |")
  print(f"|{'-' * 38}|{'-' * 10}|{'-' * 11}|")
  for name, seconds in results.items():
    count = tokens * (len(LAMS) if "6" in name else 1)
    rate = "" if "prefill" in name else f"{count / seconds:9.0f}"
    print(f"| {name:36s} | {seconds:8.3f} | {rate:>9s} |")
  t_dera = results["deranj DeRa"]
  print()
  print(f"| ratio | value |\n|---|---|")
  print(f"| ours / HF (DeRa, tokens/s) | {results['HF generate + DeRa processor'] / t_dera:.2f}x |")
  print(f"| ours / HF (6-lam sweep) | {hf_sweep / results['deranj 6-lam sweep (1 call)']:.2f}x |")
  print(f"| time(DeRa) / (time(ref) + time(aligned)) | "
        f"{t_dera / (results['deranj ref only'] + results['deranj aligned only']):.3f} |")
  print(f"| time(DeRa) / floor | {t_dera / floor:.2f} |")
  decode_only = t_dera - results["deranj DeRa prefill (part of DeRa)"]
  print(f"| decode loop alone (DeRa - prefill) / floor | {decode_only / floor:.2f} |")
  print(f"| compiles: first call / batched sweep (cold: {sweep_cold:.1f} s) / "
        f"6 scalar-lam calls | {warm_compiles.count} / {sweep_compiles.count} / "
        f"{scalar_compiles.count} |")


def transformers_list(processor):
  import transformers
  return transformers.LogitsProcessorList([processor])


if __name__ == "__main__":
  main()
