"""DeRa sampling throughput: deranj against transformers `generate`, and the roofline floor.

Same random weights in both (T5-small shape by default: d_model 512, 6+6 layers, 8 heads,
d_ff 1024 gated-GELU, vocab 32128), batch 16, 128-token prompts, 64 new tokens forced
(EOS never ends a row), float32, this machine's CPU.

Arms (--arms, comma-separated; all by default):
  dera      deranj DeRa (two KV-cached models in one compiled while_loop)
  dera_before    the same sampler compiled as before issue #17's step changes: each
            decoding step's q/k/v and wi_0/wi_1 as separate matmuls
            (T5Config.fuse_decode_projections off), the kernels in their stored [K, N]
            layout (transpose_decode_kernels off) and the draw by a prefix sum over the whole
            vocabulary (`one_level_draw`): an A/B of those changes within one run
  dera_stored    the same sampler with the decoding steps reading the kernels in their
            stored [K, N] layout (T5Config.transpose_decode_kernels off): an A/B of that
            change alone
  dera_bf16 the same sampler with both models' weights and activations in bfloat16
            (T5Config.dtype; logits, softmaxes and the mix stay float32); prints how many
            tokens match float32 DeRa's and, on rows that match, the |log q| difference
  prefill   its prefill alone: both encoders + cross-attention keys/values (part of dera)
  ref, aligned   deranj, one model only
  hf        transformers `generate` with a DeRa logits processor written as the official
            demo does it (the reference model runs inside the processor with its own cache)
  sweep     a 6-value lam sweep in one batched deranj call (num_decodes=6)
  hf_sweep  the same 6 lams as 6 separate transformers runs

Timing: after one warm-up call of each, --rounds rounds; round i runs the arms and the
probes rotated by i, so each takes every position and load from other processes falls
on all alike. Each arm is reported as median [min-max] over rounds; ratios are taken
within a round, then summarised the same way. The probes (streaming read and copy
bandwidth of a 512 MiB array; float32 matmuls at the decode step's own shapes, the
faster of two layouts, `profiling.Probes`) run in
every round, and a WARNING says when they varied by more than LOAD_SPREAD: the machine
was loaded and the spread of the arms is the first thing to read.

The floor is a roofline, counted analytically from the T5 config and shapes
(`decode_step_cost`), for each decode step t = 0 .. n-1 and each model:
  bytes  the decoder weights (less the cross-attention key/value kernels, used only at
         prefill), the self-attention cache read over t + 1 positions and this step's
         keys/values written, the cross-attention keys/values (once per prompt, also in
         the sweep), the output head, and the logits [M, B, V] float32 written by the
         heads and read once by the sampler (one fused pass over the vocabulary);
  FLOPs  2 per multiply-add of every matmul (weights, attention scores and contexts
         over t + 1 and over the prompt, head), plus VOCAB_FLOPS_PER_MODEL per logit and
         VOCAB_FLOPS_MIXED per mixed logit for the sampling ops.
floor = sum over steps of max(bytes / read bandwidth, FLOPs time), with the median
probes of this run: the reduction's bandwidth (weights are streamed, not copied) and,
for the FLOPs, each weight matmul at the rate probed at its own shape (`weight_matmuls`:
[B, d_model] x [d_model, 3 H K] for the fused q|k|v, ..., [B, d_model] x [d_model, V]
for a head), attention's and the vocabulary ops' few FLOPs at the best of those rates.
A second, higher floor sums the same max part by part (weights, cache, cross K/V,
heads, vocabulary ops), as if they ran one after another with no overlap of one
part's memory traffic with another's arithmetic. The prefill's floor is counted
the same way (encoders and cross-attention keys/values, at the [B*S, d_model] x
[d_model, d_ff] matmul rate) and added for the whole-call arms.

--profile (also the end of a run whose arms include dera and prefill) splits one DeRa
decode step into separately jitted pieces on the real weights and caches: the
decoders' matmuls, attention, the two heads, the mix, and the sampler's vocabulary ops
(the real loop body on fixed logits), timed in interleaved rounds, with XLA's cost
analysis and the analytic counts beside them.

    python scripts/bench_sampler.py [--batch 16 --prompt_len 128 --new_tokens 64]
        [--rounds 5] [--arms dera,prefill,...] [--profile] [--json PATH]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Mapping, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deranj import decoding  # noqa: E402
from deranj import dera  # noqa: E402
from deranj import profiling  # noqa: E402
from deranj.models import build  # noqa: E402
from deranj.models import hf  # noqa: E402
from deranj.models import t5  # noqa: E402

LAMS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
NEVER = -1  # an EOS id no token equals: every row decodes all new tokens
ARMS = ("dera", "dera_before", "dera_stored", "dera_bf16", "prefill", "ref", "aligned", "hf",
        "sweep", "hf_sweep")
LOAD_SPREAD = 0.2  # (max - min) / max of a probe across rounds above this: loaded
F32 = 4  # bytes
# Sampling ops, FLOPs per element (a transcendental counts 1): per model logit, the mix's
# multiply-add (2), its log-softmax (max-subtract, exp, sum: 3) and log Z's weighted sum
# (2); per mixed logit, q's log-softmax (3), exp (1), the CDF (1) and the KL term (3).
VOCAB_FLOPS_PER_MODEL = 7
VOCAB_FLOPS_MIXED = 8
SMALL = dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2)


# ----------------------------------------------------------------------------- roofline


def decode_step_cost(cfg: build.T5Config, *, models: int, rows: int, prompts: int, prompt_len: int,
                     position: int) -> dict[str, tuple[float, float]]:
  """{part: (bytes, FLOPs)} one decode step at `position` (0-based) must move and do.

  `models` decoders of config `cfg` decode `rows` rows; the cross-attention keys/values
  are stored once per prompt (`prompts` of `prompt_len` tokens) and read once.
  """
  d, hk, f, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
  layers = cfg.decoder_layers
  mlp_in = 2 if cfg.is_gated else 1
  layer_macs = 4 * d * hk + 2 * d * hk + (mlp_in + 1) * d * f  # self qkvo, cross qo, MLP
  # Layer norms, the final norm, the relative-position table, this step's embedding rows.
  small = (3 * layers + 1) * d + cfg.relative_attention_num_buckets * cfg.num_heads + rows * d
  seen = position + 1
  return {
      "decoder weights": (models * F32 * (layers * layer_macs + small),
                          models * 2 * rows * layers * layer_macs),
      "self-attention cache": (models * F32 * layers * 2 * rows * hk * (seen + 1),
                               models * layers * 2 * 2 * rows * hk * seen),
      "cross-attention K/V": (models * F32 * layers * 2 * prompts * prompt_len * hk,
                              models * layers * 2 * 2 * rows * hk * prompt_len),
      "output heads": (models * F32 * d * v, models * 2 * rows * d * v),
      "vocabulary ops": (models * F32 * 2 * rows * v,
                         rows * v * (VOCAB_FLOPS_PER_MODEL * models + VOCAB_FLOPS_MIXED)),
  }


def prefill_cost(cfg: build.T5Config, *, models: int, prompts: int, prompt_len: int
                 ) -> tuple[float, float]:
  """(bytes, FLOPs) of encoding the prompts and projecting the cross-attention K/V."""
  d, hk, f, s = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, prompt_len
  mlp_in = 2 if cfg.is_gated else 1
  enc_layer = 4 * d * hk + (mlp_in + 1) * d * f
  weights = cfg.num_layers * enc_layer + cfg.decoder_layers * 2 * d * hk
  tokens = prompts * s
  macs = (tokens * weights + cfg.num_layers * 2 * prompts * s * s * hk)
  kv_written = cfg.decoder_layers * 2 * tokens * hk
  return models * F32 * (weights + kv_written + tokens * d), models * 2.0 * macs


def weight_matmuls(cfg: build.T5Config, *, rows: int) -> dict[tuple[int, int, int], int]:
  """{(m, k, n): count}: the [m, k] x [k, n] weight matmuls of one model's decode step.

  As the sampler does them (T5Config.fuse_decode_projections): self-attention q|k|v as one
  matmul, o; cross-attention q, o (its keys/values are projected at prefill); the MLP's
  wi (wi_0|wi_1 when gated) and wo, per decoder layer; the output head once.
  """
  d, hk, f, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
  layers = cfg.decoder_layers
  mlp_in = 2 if cfg.is_gated else 1
  counts = collections.Counter()
  for shape, per_layer in (((rows, d, 3 * hk), 1), ((rows, hk, d), 2), ((rows, d, hk), 1),
                           ((rows, d, mlp_in * f), 1), ((rows, f, d), 1)):
    counts[shape] += per_layer * layers
  counts[(rows, d, v)] += 1
  return dict(counts)


def matmul_probe_name(shape: tuple[int, int, int]) -> str:
  m, k, n = shape
  return f"[{m},{k}]x[{k},{n}]"


def _compute_seconds(cfg, parts, *, models, rows, matmul_rate) -> dict[str, float]:
  """{part: seconds} of its FLOPs: the weight matmuls each at its own shape's rate when
  `matmul_rate` maps shapes to FLOP/s, the rest (attention, vocabulary ops) at the best."""
  if not isinstance(matmul_rate, Mapping):
    return {name: fl / matmul_rate for name, (_, fl) in parts.items()}
  at_own_rates = lambda shapes: models * sum(2.0 * math.prod(sh) * c / matmul_rate[sh]
                                             for sh, c in shapes.items())
  heads = at_own_rates({(rows, cfg.d_model, cfg.vocab_size): 1})
  best = max(matmul_rate.values())
  seconds = {name: fl / best for name, (_, fl) in parts.items()}
  seconds["decoder weights"] = at_own_rates(weight_matmuls(cfg, rows=rows)) - heads
  seconds["output heads"] = heads
  return seconds


def roofline(cfg, *, models, rows, prompts, prompt_len, steps, read_bw, matmul_rate):
  """Per-step counts summed over `steps` decode steps, and the floor at these rates.

  `matmul_rate`: FLOP/s, one number for all FLOPs, or {(m, k, n): FLOP/s} covering
  `weight_matmuls(cfg, rows=rows)` (each matmul at its own shape's rate; the other FLOPs
  at the best of them). `floor_s` sums max(bytes / read_bw, FLOPs time) per step (memory
  and compute overlap within a step); `floor_by_part_s` sums it per part per step (the
  parts run one after another, as XLA:CPU runs a step's ops), never lower.
  """
  total_bytes = total_flops = floor = by_part_floor = mem_s = comp_s = 0.0
  memory_bound = 0
  by_part = {}
  for t in range(steps):
    parts = decode_step_cost(cfg, models=models, rows=rows, prompts=prompts,
                             prompt_len=prompt_len, position=t)
    comp_by_part = _compute_seconds(cfg, parts, models=models, rows=rows,
                                    matmul_rate=matmul_rate)
    nbytes = sum(b for b, _ in parts.values())
    flops = sum(fl for _, fl in parts.values())
    for name, (b, fl) in parts.items():
      part_floor = max(b / read_bw, comp_by_part[name])
      acc = by_part.setdefault(name, [0.0, 0.0, 0.0])
      acc[0] += b / steps
      acc[1] += fl / steps
      acc[2] += part_floor / steps
      by_part_floor += part_floor
    total_bytes += nbytes
    total_flops += flops
    mem, comp = nbytes / read_bw, sum(comp_by_part.values())
    mem_s, comp_s = mem_s + mem, comp_s + comp
    floor += max(mem, comp)
    memory_bound += mem >= comp
  return {"bytes_per_step": total_bytes / steps, "flops_per_step": total_flops / steps,
          "memory_floor_s": mem_s, "compute_floor_s": comp_s, "floor_s": floor,
          "floor_by_part_s": by_part_floor,
          "memory_bound_steps": int(memory_bound), "steps": steps,
          "per_step_by_part": {k: {"bytes": b, "flops": fl, "floor_s": fs}
                               for k, (b, fl, fs) in by_part.items()}}


def prefill_floor(cfg, *, models, prompts, prompt_len, read_bw, matmul_rate) -> float:
  nbytes, flops = prefill_cost(cfg, models=models, prompts=prompts, prompt_len=prompt_len)
  return max(nbytes / read_bw, flops / matmul_rate)


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


def make_dera_processor(ref_model, lam: float, prompt_ids, attention_mask):
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
            input_ids=prompt_ids, attention_mask=attention_mask)
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


def one_level_draw(rng, probs):
  """decoding.sample_from_probs before issue #17 (the dera_before arm): one prefix sum over
  the whole vocabulary."""
  cdf = jnp.cumsum(probs, axis=-1)
  u = (1.0 - jax.random.uniform(rng, probs.shape[:-1] + (1,))) * cdf[..., -1:]
  return jnp.sum(cdf < u, axis=-1)


# ----------------------------------------------------------------------------- profile


CONTRACT_MINOR = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]
FUSED_STORED = "fused_kernel"  # a fused q|k|v or wi_0|wi_1 kernel in the stored layout


def step_kernels(models, params):
  """Each model's parameters as its decoding steps read them (the model's `step_params`),
  and, for a model without transposed step kernels but with
  T5Config.fuse_decode_projections, its concatenated q|k|v and wi_0|wi_1 kernels
  [K, N]. Made outside the timed pieces, as the sampler makes them outside its loop."""
  out = []
  for model, p in zip(models, params):
    cfg, p = model.config, model.step_params(p)
    if cfg.fuse_decode_projections and not cfg.transpose_decode_kernels:
      d, decoder = cfg.d_model, dict(p["decoder"])
      for i in range(cfg.decoder_layers):
        layer = dict(decoder[f"layers_{i}"])
        groups = [("self_attention", ("query", "key", "value"))]
        groups += [("mlp", ("wi_0", "wi_1"))] if cfg.is_gated else []
        for block, names in groups:
          kernel = jnp.concatenate([layer[block][n]["kernel"].reshape(d, -1) for n in names],
                                   axis=1)
          layer[block] = {**layer[block], FUSED_STORED: kernel}
        decoder[f"layers_{i}"] = layer
      p = {**p, "decoder": decoder}
    out.append(p)
  return out


def _matmul(h, dense, fan_in: int):
  """h [rows, fan_in] times a Dense's kernel, in the layout the steps read it."""
  if t5.STEP_KERNEL in dense:
    return jax.lax.dot_general(h, dense[t5.STEP_KERNEL], CONTRACT_MINOR)
  return h @ dense["kernel"].reshape(fan_in, -1)


def _fused_matmul(h, block):
  """h times a block's fused input projections, or None when the steps do not fuse."""
  if t5.FUSED_STEP_KERNEL in block:
    return jax.lax.dot_general(h, block[t5.FUSED_STEP_KERNEL], CONTRACT_MINOR)
  return h @ block[FUSED_STORED] if FUSED_STORED in block else None


def decoder_matmuls(cfgs, params, x):
  """Every decoder-layer matmul of one decode step of each model, chained: [rows, D] ->
  [M, rows, D] (the weights' work without attention, norms or activations). `params`:
  raw, or `step_kernels` (the layout and fusion the sampler's steps use)."""
  outs = []
  for cfg, p in zip(cfgs, params):
    d, hk, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    h = x
    for i in range(cfg.decoder_layers):
      layer = p["decoder"][f"layers_{i}"]
      sa, ca, mlp = layer["self_attention"], layer["encoder_decoder_attention"], layer["mlp"]
      y = _fused_matmul(h, sa)
      if y is not None:
        qkv = y[:, :hk] + y[:, hk:2 * hk] + y[:, 2 * hk:]
      else:
        qkv = sum(_matmul(h, sa[n], d) for n in ("query", "key", "value"))
      h = h + _matmul(qkv, sa["out"], hk)
      h = h + _matmul(_matmul(h, ca["query"], d), ca["out"], hk)
      z = _fused_matmul(h, mlp) if cfg.is_gated else None
      if z is not None:
        inner = z[:, :f] * z[:, f:]
      elif cfg.is_gated:
        inner = _matmul(h, mlp["wi_0"], d) * _matmul(h, mlp["wi_1"], d)
      else:
        inner = _matmul(h, mlp["wi"], d)
      h = h + _matmul(inner, mlp["wo"], cfg.d_ff)
    outs.append(h)
  return jnp.stack(outs)


def decoder_attention(cfgs, caches, query):
  """Self-attention over the whole cache and cross-attention over the prompt, every layer
  of each model, as t5.Attention computes them (scores, bias, softmax, contexts)."""
  outs = []
  for cfg, cache in zip(cfgs, caches):
    dec = cache["decoder"]
    q = query  # [rows, H, 1, K]
    self_bias = jnp.zeros(dec["key_positions"].shape, jnp.float32)
    for i in range(cfg.decoder_layers):
      layer = dec[f"layers_{i}"]
      for key, value, bias in (
          (layer["self_attention"]["cached_key"], layer["self_attention"]["cached_value"],
           self_bias),
          (layer["encoder_decoder_attention"]["cross_key"],
           layer["encoder_decoder_attention"]["cross_value"], dec["encoder_bias"])):
        scores = jnp.einsum("bhqk,bhsk->bhqs", q, key) + bias
        ctx = jnp.einsum("bhqs,bhsk->bqhk", jax.nn.softmax(scores, axis=-1), value)
        q = jnp.swapaxes(ctx, 1, 2)
    outs.append(q)
  return jnp.stack(outs)


def output_heads(cfgs, params, x):
  """[rows, D] -> [M, rows, V] logits of each model's head."""
  outs = []
  for cfg, p in zip(cfgs, params):
    if cfg.tie_word_embeddings:
      outs.append((x * cfg.d_model**-0.5) @ p["token_embedder"]["embedding"].T)
    else:
      outs.append(_matmul(x, p["decoder"]["logits_dense"], cfg.d_model))
  return jnp.stack(outs)


def one_step(tokens_to_logits, caches, weights, rng):
  """One iteration of the sampler's real loop (max_decode_len 1) over `caches`."""
  return decoding.mixture_sample(tokens_to_logits, caches, weights, rng,
                                 decoding.SamplingConfig(1, eos_id=NEVER)).tokens


def profile_step(models, params, prompts_j, n: int, rounds: int, loop_step_s: float,
                 prompt_len: int, part_floors: Optional[Mapping[str, dict]] = None
                 ) -> list[dict]:
  """Per-piece ms/step, share of the loop's step, XLA's and the analytic counts, and with
  `part_floors` (roofline's per_step_by_part at this run's probes) each piece's floor."""
  cfgs = [m.config for m in models]
  cfg = cfgs[0]
  rows = prompts_j.shape[0]
  caches = jax.jit(lambda p, x: decoding.init_caches(models, p, x, n))(params, prompts_j)
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (rows, cfg.d_model), jnp.float32)
  query = jax.random.normal(key, (rows, cfg.num_heads, 1, cfg.d_kv), jnp.float32)
  logits = jax.random.normal(key, (len(models), rows, cfg.vocab_size), jnp.float32)
  weights = jnp.tile(jnp.asarray([[0.5, 0.5]], jnp.float32), (rows, 1))
  fixed = lambda lg: (lambda t, c: (lg, c))
  real = lambda p: decoding.models_tokens_to_logits(models, p)
  stepping = step_kernels(models, params)
  # name, function, its arguments, the analytic parts it does (at the mean step)
  pieces = [
      ("decoder matmuls (q,k,v,o; cross q,o; MLP)",
       lambda p, x: decoder_matmuls(cfgs, p, x), (stepping, x), ("decoder weights",)),
      ("attention (self over cache, cross over prompt)",
       lambda c, q: decoder_attention(cfgs, c, q), (caches, query),
       ("self-attention cache", "cross-attention K/V")),
      ("output heads", lambda p, x: output_heads(cfgs, p, x), (stepping, x),
       ("output heads",)),
      ("sampler vocabulary ops (mix, log-softmaxes, stats, draw)",
       lambda lg, w, r: one_step(fixed(lg), (), w, r), (logits, weights, key),
       ("vocabulary ops",)),
      ("mix (sum_m w_m h_m)", decoding.mixture_logits, (logits, weights), ()),
      # Its caches are copied in (not donated): XLA's bytes count that copy too.
      ("one full sampler step (the real loop body, alone)",
       lambda p, c, w, r: one_step(real(p), c, w, r), (stepping, caches, weights, key),
       ("decoder weights", "self-attention cache", "cross-attention K/V", "output heads",
        "vocabulary ops")),
  ]
  counts = roofline(cfg, models=len(models), rows=rows, prompts=rows, prompt_len=prompt_len,
                    steps=n, read_bw=1.0, matmul_rate=1.0)["per_step_by_part"]
  reps = 5
  arms, table = {}, []
  for name, fn, args, parts in pieces:
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    arms[name] = lambda jitted=jitted, args=args: [
        jax.block_until_ready(jitted(*args)) for _ in range(reps)]
    table.append({"piece": name, "xla": profiling.xla_cost(fn, *args),
                  "analytic": {"flops": sum(counts[p]["flops"] for p in parts),
                               "bytes": sum(counts[p]["bytes"] for p in parts)} if parts
                  else None})
    if part_floors and parts:
      table[-1]["floor_s"] = sum(part_floors[p]["floor_s"] for p in parts)
  times = profiling.interleaved_rounds(arms, rounds)
  for row in table:
    row["seconds"] = profiling.spread([t / reps for t in times[row["piece"]]])
    row["share"] = row["seconds"]["median"] / loop_step_s if loop_step_s > 0 else float("nan")
  # The first three and the vocabulary ops partition the step; the rest is by difference.
  rest = loop_step_s - sum(table[i]["seconds"]["median"] for i in range(4))
  table.insert(5, {"piece": "rest: norms, embeddings, cache writes, loop (by difference)",
                   "seconds": {"median": rest},
                   "share": rest / loop_step_s if loop_step_s > 0 else float("nan")})
  return table


def print_profile(table, loop_step_s: float):
  print(f"\nOne DeRa decode step, by piece (each jitted alone, median of interleaved rounds; "
        f"share of the loop's step, {loop_step_s * 1e3:.1f} ms = (DeRa - prefill) / steps):\n")
  floors = any("floor_s" in row for row in table)
  print("| piece | ms/step [min-max] | share | XLA GFLOP | XLA MiB | analytic GFLOP "
        "| analytic MiB |" + (" floor ms | ÷ floor |" if floors else ""))
  print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if floors else ""))
  for i, row in enumerate(table):
    if i == 6:
      print("| *cross-check:* | | | | | | |" + (" | |" if floors else ""))
    sec = row["seconds"]
    cells = [f"{sec['median'] * 1e3:.2f}"]
    if "min" in sec:
      cells[0] += f" [{sec['min'] * 1e3:.2f}-{sec['max'] * 1e3:.2f}]"
    cells.append(f"{row['share']:.0%}")
    for counts in (row.get("xla"), row.get("analytic")):
      cells += ([f"{counts['flops'] / 1e9:.3f}", f"{counts['bytes'] / 2**20:.1f}"] if counts
                else ["", ""])
    if floors:
      cells += ([f"{row['floor_s'] * 1e3:.2f}", f"{sec['median'] / row['floor_s']:.2f}"]
                if "floor_s" in row else ["", ""])
    name = ("  of which " if i == 4 else "") + row["piece"]
    print(f"| {name} | " + " | ".join(cells) + " |")


def _fmt_spread(sp, scale=1.0, digits=3):
  return (f"{sp['median'] * scale:.{digits}f} [{sp['min'] * scale:.{digits}f}-"
          f"{sp['max'] * scale:.{digits}f}]")


def parse_arms(text: str, choices=ARMS) -> list[str]:
  """'dera,hf' -> ['dera', 'hf'], each one of `choices`."""
  arms = [a.strip() for a in text.split(",") if a.strip()]
  unknown = [a for a in arms if a not in choices]
  if unknown or not arms:
    raise ValueError(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {','.join(choices)}")
  return arms


def add_common_flags(parser: argparse.ArgumentParser, arms) -> None:
  """The flags every sampler benchmark takes (shape, rounds, arms, JSON, --small)."""
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--arms", default=",".join(arms), help=f"comma-separated, of {arms}")
  parser.add_argument("--json", default="", help="write every number to this file")
  parser.add_argument("--small", action="store_true", help="a tiny shape, to try the script")


def check_common_flags(parser: argparse.ArgumentParser, args, arms) -> list[str]:
  """The arms wanted; a parser error for a bad flag of `add_common_flags`."""
  try:
    wanted = parse_arms(args.arms, arms)
  except ValueError as e:
    parser.error(str(e))
  for flag in ("batch", "prompt_len", "new_tokens", "rounds"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    parser.error(f"--json {args.json}: its directory does not exist")
  return wanted


def summarise_probes(probe_rounds: list[dict[str, float]]):
  """Prints the probes' spread over rounds and a WARNING if they show load; returns
  ({probe: spread}, {probe: relative variation} of those above LOAD_SPREAD)."""
  probe_spread = {k: profiling.spread([p[k] for p in probe_rounds]) for k in probe_rounds[0]}
  print("\nprobes, median [min-max] over rounds:")
  for k, sp in probe_spread.items():
    unit = "GB/s" if k in ("read", "copy") else "GFLOP/s"
    print(f"  {k:28s} {_fmt_spread(sp, 1e-9, 1)} {unit}")
  varied = {k: 1 - sp["min"] / sp["max"] for k, sp in probe_spread.items()}
  loaded = {k: v for k, v in varied.items() if v > LOAD_SPREAD}
  if loaded:
    print("WARNING: the machine was loaded: probes varied across rounds by "
          + ", ".join(f"{k} {v:.0%}" for k, v in loaded.items())
          + f" (> {LOAD_SPREAD:.0%}); read the arms' min-max before their medians.")
  return probe_spread, loaded


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_flags(parser, ARMS)
  parser.add_argument("--profile", action="store_true", help="only the per-step profile")
  args = parser.parse_args(argv)
  arms_wanted = check_common_flags(parser, args, ARMS)

  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  shape = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=8, num_layers=6,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  if args.small:
    shape.update(SMALL)
  b, s, n = args.batch, args.prompt_len, args.new_tokens

  with tempfile.TemporaryDirectory() as tmp:
    (ref_hf, ref_dir), (al_hf, al_dir) = hf_models(shape, tmp)
    ref_cfg, ref_p = hf.load_t5(ref_dir, dropout_rate=0.0)
    al_cfg, al_p = hf.load_t5(al_dir, dropout_rate=0.0)
  ref = build.build_model(ref_cfg, z_loss=0.0)
  al = build.build_model(al_cfg, z_loss=0.0)
  prompts = np.random.default_rng(0).integers(2, shape["vocab_size"], size=(b, s))
  prompts[:, -1] = 1
  prompts_j = jnp.asarray(prompts, jnp.int32)
  rng = jax.random.PRNGKey(0)
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=n, eos_id=NEVER)

  def ours_dera():
    realigner.sample(prompts_j, 0.5, rng).tokens.block_until_ready()

  unfused = [build.build_model(dataclasses.replace(c, fuse_decode_projections=False,
                                                   transpose_decode_kernels=False),
                               z_loss=0.0) for c in (ref_cfg, al_cfg)]
  before = dera.Realigner(unfused[0], ref_p, unfused[1], al_p, max_decode_len=n,
                          eos_id=NEVER)

  def ours_dera_before():  # compiled on its first call with the old draw; kept after
    saved = decoding.sample_from_probs
    decoding.sample_from_probs = one_level_draw
    try:
      before.sample(prompts_j, 0.5, rng).tokens.block_until_ready()
    finally:
      decoding.sample_from_probs = saved

  stored = [build.build_model(dataclasses.replace(c, transpose_decode_kernels=False),
                              z_loss=0.0) for c in (ref_cfg, al_cfg)]
  as_stored = dera.Realigner(stored[0], ref_p, stored[1], al_p, max_decode_len=n,
                             eos_id=NEVER)

  def ours_dera_stored():
    as_stored.sample(prompts_j, 0.5, rng).tokens.block_until_ready()

  bf16 = None
  if "dera_bf16" in arms_wanted:  # a bfloat16 copy of both models' weights
    half = [build.build_model(dataclasses.replace(c, dtype=jnp.bfloat16,
                                                  param_dtype=jnp.bfloat16), z_loss=0.0)
            for c in (ref_cfg, al_cfg)]
    to_bf16 = lambda p: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p)
    bf16 = dera.Realigner(half[0], to_bf16(ref_p), half[1], to_bf16(al_p),
                          max_decode_len=n, eos_id=NEVER)

  def ours_dera_bf16():
    bf16.sample(prompts_j, 0.5, rng).tokens.block_until_ready()

  prefill_fn = jax.jit(lambda params, x: decoding.init_caches((ref, al), params, x, n))

  def ours_prefill():  # both encoders + cross-attention keys/values, once per prompt batch
    jax.block_until_ready(prefill_fn((ref_p, al_p), prompts_j))

  def ours_single(model, params):
    return lambda: decoding.sample(model, params, prompts_j, rng, max_decode_len=n,
                                   eos_id=NEVER).tokens.block_until_ready()

  sweep_lams = np.tile(np.asarray(LAMS, np.float32), b)  # one lam per output row

  def ours_sweep():  # each prompt encoded once, decoded at every lam
    realigner.sample(prompts_j, sweep_lams, rng,
                     num_decodes=len(LAMS)).tokens.block_until_ready()

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

  def hf_sweep():
    for lam in LAMS:
      hf_dera(lam)()

  cores, cpu = os.cpu_count(), profiling.cpu_description()
  print(f"bench_sampler: batch {b}, prompt {s}, {n} new tokens, float32, "
        f"{jax.devices()[0].platform} x{cores} cores, jax {jax.__version__}, "
        f"torch {torch.__version__}, {args.rounds} rounds\n  on {cpu}")
  report = {"config": {"batch": b, "prompt_len": s, "new_tokens": n, "rounds": args.rounds,
                       "cores": cores, "cpu": cpu,
                       "shape": shape, "jax": jax.__version__,
                       "torch": torch.__version__}}

  if args.profile:
    times = profiling.interleaved_rounds({"dera": ours_dera, "prefill": ours_prefill},
                                         args.rounds + 1)
    loop = [d - p for d, p in zip(times["dera"][1:], times["prefill"][1:])]  # 1st: compiles
    loop_step = statistics.median(loop) / n
    report["profile"] = profile_step((ref, al), (ref_p, al_p), prompts_j, n, 2 * args.rounds,
                                     loop_step, s)
    print_profile(report["profile"], loop_step)
    report["profile_loop_step_s"] = loop_step
    _write_json(args.json, report)
    return

  names = {"dera": "deranj DeRa", "dera_before": "deranj DeRa, step as before #17",
           "dera_stored": "deranj DeRa, kernels as stored",
           "dera_bf16": "deranj DeRa, bfloat16",
           "prefill": "deranj DeRa prefill (part of DeRa)",
           "ref": "deranj ref only", "aligned": "deranj aligned only",
           "hf": "HF generate + DeRa processor", "sweep": "deranj 6-lam sweep (1 call)",
           "hf_sweep": "HF 6 separate runs"}
  fns = {"dera": ours_dera, "dera_before": ours_dera_before, "dera_stored": ours_dera_stored,
         "dera_bf16": ours_dera_bf16,
         "prefill": ours_prefill, "ref": ours_single(ref, ref_p),
         "aligned": ours_single(al, al_p), "hf": hf_dera(0.5), "sweep": ours_sweep,
         "hf_sweep": hf_sweep}
  compiles = {}
  if "dera" in arms_wanted:
    with profiling.count_compiles("_sample_logit_mixed") as c:
      ours_dera()
    compiles["first DeRa call"] = c.count
  if "sweep" in arms_wanted:
    with profiling.count_compiles("_sample_logit_mixed") as c:
      start = time.perf_counter()
      ours_sweep()
      report["sweep_cold_s"] = time.perf_counter() - start
    compiles["batched sweep"] = c.count
    if "dera" in arms_wanted:
      with profiling.count_compiles("_sample_logit_mixed") as c:
        for lam in LAMS:
          realigner.sample(prompts_j, lam, rng).tokens.block_until_ready()
      compiles["6 scalar-lam calls"] = c.count
  for arm in arms_wanted:  # warm-up: compiles, torch's allocations
    fns[arm]()

  # Every weight matmul shape of a decode step (and of the sweep's, at its rows).
  decode_rows = (b, b * len(LAMS)) if "sweep" in arms_wanted else (b,)
  decode_shapes = {r: weight_matmuls(ref_cfg, rows=r) for r in decode_rows}
  probe_shapes = {matmul_probe_name(sh): sh for shapes in decode_shapes.values() for sh in shapes}
  prefill_shape = (b * s, shape["d_model"], shape["d_ff"])
  probes = profiling.Probes({**probe_shapes, "prefill " + matmul_probe_name(prefill_shape):
                             prefill_shape}, megabytes=64 if args.small else 512)
  probe_rounds = []
  timed = {names[a]: fns[a] for a in arms_wanted}
  timed["probes"] = lambda: probe_rounds.append(probes.measure())
  times = profiling.interleaved_rounds(
      timed, args.rounds, log=lambda line: print(line, file=sys.stderr, flush=True))
  del times["probes"]

  probe_spread, loaded = summarise_probes(probe_rounds)
  read_bw = probe_spread["read"]["median"]
  rates = {r: {sh: probe_spread[f"matmul {matmul_probe_name(sh)}"]["median"] for sh in shapes}
           for r, shapes in decode_shapes.items()}
  prefill_rate = probe_spread[f"matmul prefill {matmul_probe_name(prefill_shape)}"]["median"]

  cfg = ref_cfg
  rl = lambda models, rows: roofline(cfg, models=models, rows=rows, prompts=b, prompt_len=s,
                                     steps=n, read_bw=read_bw, matmul_rate=rates[rows])
  pf = lambda models: prefill_floor(cfg, models=models, prompts=b, prompt_len=s,
                                    read_bw=read_bw, matmul_rate=prefill_rate)
  sweep_rows = b * len(LAMS) if "sweep" in arms_wanted else b  # unused without the arm
  dera_rl, single_rl, sweep_rl = rl(2, b), rl(1, b), rl(2, sweep_rows)
  floors = {"dera": dera_rl["floor_s"] + pf(2), "prefill": pf(2),
            "ref": single_rl["floor_s"] + pf(1), "aligned": single_rl["floor_s"] + pf(1),
            "dera_before": dera_rl["floor_s"] + pf(2), "hf": dera_rl["floor_s"] + pf(2),
            "dera_stored": dera_rl["floor_s"] + pf(2),
            "dera_bf16": dera_rl["floor_s"] + pf(2),  # float32's: the table's common floor
            "sweep": sweep_rl["floor_s"] + pf(2),
            "hf_sweep": len(LAMS) * (dera_rl["floor_s"] + pf(2))}
  binds = "memory" if 2 * dera_rl["memory_bound_steps"] >= n else "compute"
  print(f"\nroofline per DeRa decode step (mean of {n} steps): "
        f"{dera_rl['bytes_per_step'] / 2**20:.1f} MiB, "
        f"{dera_rl['flops_per_step'] / 1e9:.2f} GFLOP; memory floor "
        f"{dera_rl['memory_floor_s'] / n * 1e3:.1f} ms at {read_bw / 1e9:.1f} GB/s "
        f"(streaming read), compute floor {dera_rl['compute_floor_s'] / n * 1e3:.1f} ms "
        f"(each weight matmul at its own shape's rate: " + ", ".join(
            f"{matmul_probe_name(sh)} {r / 1e9:.0f}" for sh, r in rates[b].items())
        + f" GFLOP/s); {binds} binds ({dera_rl['memory_bound_steps']} of {n} steps "
        f"memory-bound); decode floor {dera_rl['floor_s'] * 1e3:.0f} ms (summed part by "
        f"part: {dera_rl['floor_by_part_s'] * 1e3:.0f} ms), prefill floor {pf(2) * 1e3:.0f} ms")
  print("  per step by part (MiB, GFLOP, floor ms): " + "; ".join(
      f"{k} {v['bytes'] / 2**20:.1f}, {v['flops'] / 1e9:.3f}, {v['floor_s'] * 1e3:.2f}"
      for k, v in dera_rl["per_step_by_part"].items()))

  tokens = b * n
  arms_out = {}
  print(f"\n| run (median [min-max] of {args.rounds}) | time (s) | tokens/s | floor (s) "
        f"| time / floor |")
  print("|---|---:|---:|---:|---:|")
  for arm in arms_wanted:
    sp = profiling.spread(times[names[arm]])
    count = tokens * (len(LAMS) if "sweep" in arm else 1)
    rate = "" if arm == "prefill" else f"{count / sp['median']:.0f}"
    arms_out[arm] = dict(name=names[arm], times=times[names[arm]], floor_s=floors[arm],
                         time_over_floor=sp["median"] / floors[arm], **sp)
    print(f"| {names[arm]} | {_fmt_spread(sp)} | {rate} | {floors[arm]:.3f} "
          f"| {sp['median'] / floors[arm]:.2f} |")

  ratios = {}
  per_round = lambda num, den: [x / y for x, y in zip(times[names[num]], times[names[den]])]
  if {"dera", "hf"} <= set(arms_wanted):
    ratios["HF / ours, DeRa (speed-up)"] = per_round("hf", "dera")
  if {"sweep", "hf_sweep"} <= set(arms_wanted):
    ratios["HF / ours, 6-lam sweep (speed-up)"] = per_round("hf_sweep", "sweep")
  if {"dera", "ref", "aligned"} <= set(arms_wanted):
    ratios["time(DeRa) / (time(ref) + time(aligned))"] = [
        d / (r + a) for d, r, a in zip(*(times[names[k]] for k in ("dera", "ref", "aligned")))]
  if {"dera", "dera_before"} <= set(arms_wanted):
    ratios["time(DeRa) / time(DeRa, step as before #17)"] = per_round("dera", "dera_before")
  if {"dera", "dera_stored"} <= set(arms_wanted):
    ratios["time(DeRa) / time(DeRa, kernels as stored)"] = per_round("dera", "dera_stored")
  if {"dera", "dera_bf16"} <= set(arms_wanted):
    ratios["time(DeRa, bfloat16) / time(DeRa)"] = per_round("dera_bf16", "dera")
    full, low = (r.sample(prompts_j, 0.5, rng) for r in (realigner, bf16))
    same = float(jnp.mean(full.tokens == low.tokens))
    first = int(jnp.argmax(jnp.any(full.tokens != low.tokens, axis=0))) if same < 1 else n
    rows = np.asarray(jnp.all(full.tokens == low.tokens, axis=1))  # log q comparable
    logq_err = (float(np.max(np.abs(np.asarray(full.logq - low.logq)[rows]))
                      / np.max(np.abs(np.asarray(full.logq)[rows]))) if rows.any() else None)
    report["bf16_agreement"] = dict(same_tokens=same, first_differing_step=first,
                                    rows_all_same=int(rows.sum()),
                                    logq_max_relative_difference=logq_err)
    print(f"\nbfloat16 DeRa against float32: {same:.1%} of tokens the same, the first "
          f"difference at step {first} of {n}; {int(rows.sum())} of {len(rows)} rows the same "
          + (f"(their log q differs by up to {logq_err:.1e} of its largest value)"
             if rows.any() else ""))
  if "dera" in arms_wanted:
    ratios["time(DeRa) / floor"] = [t / floors["dera"] for t in times[names["dera"]]]
  if {"dera", "prefill"} <= set(arms_wanted):
    loop = [d - p for d, p in zip(times[names["dera"]], times[names["prefill"]])]
    ratios["decode loop (DeRa - prefill) / decode floor"] = [t / dera_rl["floor_s"] for t in loop]
    ratios["decode loop / decode floor summed part by part"] = [
        t / dera_rl["floor_by_part_s"] for t in loop]
    report["loop_step_s"] = statistics.median(loop) / n
  if ratios:
    print(f"\n| ratio (per round; median [min-max]) | value |\n|---|---:|")
    for k, v in ratios.items():
      print(f"| {k} | {_fmt_spread(profiling.spread(v), digits=2)} |")
  if compiles:
    print("\ncompiles of the DeRa sampler: " + ", ".join(f"{k} {v}" for k, v in compiles.items())
          + (f" (sweep cold: {report['sweep_cold_s']:.1f} s)" if "sweep_cold_s" in report else ""))
  report.update(arms=arms_out, ratios={k: dict(values=v, **profiling.spread(v))
                                        for k, v in ratios.items()},
                probes={"rounds": probe_rounds, **probe_spread}, loaded=loaded,
                compiles=compiles,
                roofline={"dera": dera_rl, "single": single_rl, "sweep": sweep_rl,
                          "prefill_floor_s": {"dera": pf(2), "single": pf(1)},
                          "read_bandwidth": read_bw,
                          "decode_matmul_rates": {str(r): {matmul_probe_name(sh): v
                                                           for sh, v in rs.items()}
                                                  for r, rs in rates.items()},
                          "prefill_matmul_rate": prefill_rate})
  if "loop_step_s" in report:
    report["profile"] = profile_step((ref, al), (ref_p, al_p), prompts_j, n, 2 * args.rounds,
                                     report["loop_step_s"], s, dera_rl["per_step_by_part"])
    print_profile(report["profile"], report["loop_step_s"])
  _write_json(args.json, report)


def _write_json(path: str, report: dict):
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=float)
  os.replace(tmp, path)
  print(f"\nwrote {path}")


def transformers_list(processor):
  import transformers
  return transformers.LogitsProcessorList([processor])


if __name__ == "__main__":
  main()
