"""DeRa sampling throughput, decoder-only: deranj against transformers `generate` and TRL.

Two random LlamaForCausalLM (seeds 0 = reference, 1 = aligned; default shape 8 layers,
hidden 512, 8 query / 2 key-value heads (GQA, head_dim 64), intermediate 1408, vocab
32000, untied head, float32), written with save_pretrained and read back into deranj with
`hf.load_decoder`, so every arm runs the same weights. Batch 16, 128-token random prompts
(no padding), 64 new tokens forced (the models have no EOS: no row ends early), lam 0.5,
sampling at temperature 1 over the full vocabulary, this machine's CPU.

Arms (--arms, comma-separated; all by default):
  dera  deranj's Realigner (both models KV-cached in one compiled while_loop)
  hf    transformers `generate` on the aligned model with a decoder-only version of the
        official demo's DeRa logits processor (`make_dera_processor`): the reference model
        runs inside the processor with its own KV cache, mixing lam * aligned + (1 - lam) *
        reference logits
  trl   TRL's `GeometricMixtureWrapper` (the Nash-MD mixture generator) around the two
        models, `generate` through it. It turns the KV cache off, so every step runs both
        models over the whole sequence. It mixes `mixture_coef * ref + (1 - mixture_coef) *
        policy` logits: DeRa's lam is `mixture_coef = 1 - lam` (the same at lam 0.5). Its
        GenerationConfig says use_cache=False too: with the cache on (NashMDTrainer's
        default), transformers 5's generate() feeds only the last token each step and the
        wrapper, having dropped the cache, decodes without context (the greedy check
        below catches it). It was removed from TRL after 1.13 (trl.experimental.nash_md);
        where it cannot be imported the arm is skipped and the reason printed.

Before timing, a check that the arms compute the same thing: greedy decoding at lam 1
(the aligned model) and lam 0 (the reference, which in `hf` comes only through the
processor's own cache) gives the same tokens in every arm, on the first CHECK_ROWS
prompts for CHECK_TOKENS new tokens.

Timing, probes and the WARNING are bench_sampler.py's: after one warm-up of each arm,
--rounds interleaved rounds (arms and probes rotated per round), medians [min-max];
ratios within a round, summarised the same way. The floor is a roofline counted
analytically from the Llama config (`decode_step_cost`): for each decode step t and each
model, bytes = the layer weights, norms, this step's embedding rows and the head, the
KV cache read over the S + t positions seen plus this step's keys/values written, and the
logits written and read once by the sampler; FLOPs = 2 per multiply-add of every matmul
(weights, attention over the positions seen, head) plus the sampler's vocabulary ops
(bench_sampler's VOCAB_FLOPS_*). memory floor = sum of bytes / the streaming read
bandwidth; floor = sum over steps of max(bytes / read bandwidth, FLOPs / the best
decode-shape matmul rate), plus the prefill's (both models over the prompts, at the
[B*S, D] x [D, F] matmul rate). All three arms are set against this one floor: the
work DeRa needs, not the work an arm chooses to do.

    python scripts/bench_sampler_decoder.py [--batch 16 --prompt_len 128 --new_tokens 64]
        [--rounds 5] [--arms dera,hf,trl] [--small] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deranj import dera  # noqa: E402
from deranj import profiling  # noqa: E402
from deranj.models import base  # noqa: E402
from deranj.models import decoder  # noqa: E402
from deranj.models import hf  # noqa: E402
from scripts import bench_sampler as bs  # noqa: E402

ARMS = ("dera", "hf", "trl")
NAMES = {"dera": "deranj DeRa", "hf": "HF generate + DeRa processor",
         "trl": "TRL GeometricMixtureWrapper"}
LAM = 0.5
CHECK_ROWS, CHECK_TOKENS = 4, 8
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


# ----------------------------------------------------------------------------- roofline


def decode_step_cost(cfg: decoder.DecoderConfig, *, models: int, rows: int, prompt_len: int,
                     position: int) -> dict[str, tuple[float, float]]:
  """{part: (bytes, FLOPs)} of one decode step at `position` (0-based) of `models`
  decoders of config `cfg` over `rows` rows with `prompt_len`-token prompts."""
  d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  layer_macs = 2 * d * q + 2 * d * kv + 3 * d * f  # q, o; k, v; gate, up, down
  small = (2 * layers + 1) * d + rows * d  # RMS norms; this step's embedding rows
  seen = prompt_len + position  # positions attended, this step's included
  head = d * v
  return {
      "layer weights": (models * bs.F32 * (layers * layer_macs + small),
                        models * 2 * rows * layers * layer_macs),
      "KV cache": (models * bs.F32 * layers * 2 * rows * kv * (seen + 1),
                   models * layers * 2 * 2 * rows * q * seen),
      "output heads": (models * bs.F32 * head, models * 2 * rows * head),
      "vocabulary ops": (models * bs.F32 * 2 * rows * v,
                         rows * v * (bs.VOCAB_FLOPS_PER_MODEL * models + bs.VOCAB_FLOPS_MIXED)),
  }


def prefill_cost(cfg: decoder.DecoderConfig, *, models: int, rows: int, prompt_len: int
                 ) -> tuple[float, float]:
  """(bytes, FLOPs) of running the prompts through every layer and writing their keys
  and values (causal attention: S (S + 1) / 2 query-key pairs per head)."""
  d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  weights = layers * (2 * d * q + 2 * d * kv + 3 * d * f)
  tokens = rows * prompt_len
  macs = tokens * weights + layers * 2 * rows * q * prompt_len * (prompt_len + 1) // 2
  written = layers * 2 * tokens * kv
  return models * bs.F32 * (weights + written + tokens * d), models * 2.0 * macs


def roofline(cfg, *, models, rows, prompt_len, steps, read_bw, matmul_rate):
  """Per-step counts summed over `steps` decode steps and the floors at these rates."""
  nbytes = flops = floor = mem_s = comp_s = 0.0
  memory_bound = 0
  by_part = {}
  for t in range(steps):
    parts = decode_step_cost(cfg, models=models, rows=rows, prompt_len=prompt_len, position=t)
    b, fl = sum(x for x, _ in parts.values()), sum(y for _, y in parts.values())
    for name, (pb, pf) in parts.items():
      acc = by_part.setdefault(name, [0.0, 0.0])
      acc[0], acc[1] = acc[0] + pb / steps, acc[1] + pf / steps
    mem, comp = b / read_bw, fl / matmul_rate
    nbytes, flops, mem_s, comp_s = nbytes + b, flops + fl, mem_s + mem, comp_s + comp
    floor += max(mem, comp)
    memory_bound += mem >= comp
  return {"bytes_per_step": nbytes / steps, "flops_per_step": flops / steps,
          "memory_floor_s": mem_s, "compute_floor_s": comp_s, "floor_s": floor,
          "memory_bound_steps": int(memory_bound), "steps": steps,
          "per_step_by_part": {k: {"bytes": b, "flops": fl} for k, (b, fl) in by_part.items()}}


# ----------------------------------------------------------------------------- arms


def hf_models(shape: dict, directory: str):
  """[(reference, its directory), (aligned, its directory)]: random Llamas, seeds 0 and 1,
  without EOS (no row ends early; the sampler's NEVER on the deranj side)."""
  import torch
  import transformers
  out = []
  for seed in (0, 1):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      **shape)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0  # generate() wants one; no row ever pads
    path = os.path.join(directory, f"model{seed}")
    model.save_pretrained(path)
    out.append((model, path))
  return out


def make_dera_processor(ref_model, lam: float):
  """bench_sampler's official-demo processor for a decoder-only reference: on its first
  call it prefills the reference on the whole prompt (`input_ids`), then feeds it the one
  new token per step with its own KV cache, and mixes lam * scores + (1 - lam) * its
  logits (keeping what earlier processors set to -inf)."""
  import torch
  import transformers

  class DeRaLogitsProcessor(transformers.LogitsProcessor):

    def __init__(self):
      self.past = None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
      new = input_ids if self.past is None else input_ids[:, -1:]
      out = ref_model(input_ids=new, cache=self.past, use_cache=True, logits_to_keep=1)
      self.past = out.cache
      mixed = lam * scores + (1 - lam) * out.logits[:, -1, :]
      return torch.where(torch.isinf(scores), scores, mixed)

  return DeRaLogitsProcessor()


def load_trl_wrapper():
  """(GeometricMixtureWrapper, None) or (None, why it is unavailable)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from trl.experimental.nash_md.nash_md_trainer import GeometricMixtureWrapper
    return GeometricMixtureWrapper, None
  except ImportError as e:
    try:
      import trl
      version = f"trl {trl.__version__} is installed"
    except ImportError:
      version = "trl is not installed"
    return None, (f"{version} but GeometricMixtureWrapper cannot be imported ({e}); it was "
                  "in trl.experimental.nash_md up to trl 1.13 (pip install 'trl==1.13.0')"
                  if "installed" in version and "not" not in version else
                  f"{version} (pip install 'trl==1.13.0', the last release with "
                  "GeometricMixtureWrapper)")


class Arms:
  """The three samplers on one batch of prompts; each call returns [B, n] new tokens."""

  def __init__(self, ref, al, ref_hf, al_hf, prompts: np.ndarray, trl_wrapper):
    self.ref, self.al, self.ref_hf, self.al_hf = ref, al, ref_hf, al_hf
    self.prompts = prompts
    self.trl_wrapper = trl_wrapper
    self._realigners = {}

  def dera(self, lam, n, *, rows=None, greedy=False, seed=0):
    key = n
    if key not in self._realigners:
      (ref, ref_p), (al, al_p) = self.ref, self.al
      self._realigners[key] = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=n,
                                             eos_id=bs.NEVER)
    prompts = jnp.asarray(self.prompts[:rows], jnp.int32)
    out = self._realigners[key].sample(prompts, lam, jax.random.PRNGKey(seed),
                                       temperature=0.0 if greedy else 1.0)
    return np.asarray(out.tokens.block_until_ready())

  def _sampling(self, n, greedy):
    sampling = {} if greedy else dict(top_k=0, top_p=1.0, temperature=1.0)
    return dict(do_sample=not greedy, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                pad_token_id=0, **sampling)

  def hf(self, lam, n, *, rows=None, greedy=False, seed=0):
    import torch
    import transformers
    ids = torch.tensor(self.prompts[:rows])
    torch.manual_seed(seed)
    with torch.no_grad():
      out = self.al_hf.generate(
          input_ids=ids, attention_mask=torch.ones_like(ids),
          logits_processor=transformers.LogitsProcessorList([make_dera_processor(self.ref_hf,
                                                                                 lam)]),
          **self._sampling(n, greedy))
    return out[:, ids.shape[1]:].numpy()

  def trl(self, lam, n, *, rows=None, greedy=False, seed=0):
    import torch
    import transformers
    ids = torch.tensor(self.prompts[:rows])
    # use_cache=False here, not only in the wrapper's prepare_inputs_for_generation: with
    # the cache on, generate() (transformers 5) builds a DynamicCache and cuts the input to
    # the last token, and the wrapper, which drops the cache, decodes without context.
    config = transformers.GenerationConfig(use_cache=False, **self._sampling(n, greedy))
    mixture = self.trl_wrapper(model=self.al_hf, ref_model=self.ref_hf, generation_config=config,
                               mixture_coef=1.0 - lam, device=ids.device)
    torch.manual_seed(seed)
    with torch.no_grad():
      out = mixture.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)
    return out[:, ids.shape[1]:].numpy()


def check_greedy(arms: Arms, names: list[str], rows: int, n: int) -> dict:
  """Greedy tokens of every arm at lam 1 and lam 0 against deranj's; raises on a mismatch."""
  result = {}
  for lam in (1.0, 0.0):
    ours = arms.dera(lam, n, rows=rows, greedy=True)
    for name in names:
      if name == "dera":
        continue
      theirs = getattr(arms, name)(lam, n, rows=rows, greedy=True)
      agree = bool(np.array_equal(ours, theirs))
      result[f"{name} lam {lam:g}"] = agree
      if not agree:
        raise SystemExit(f"greedy check failed: {name} at lam {lam:g} gave other tokens than "
                         f"deranj on {rows} rows x {n} tokens:\n deranj {ours.tolist()}\n "
                         f"{name} {theirs.tolist()}")
  print(f"greedy check: {', '.join(n for n in names if n != 'dera')} = deranj token for "
        f"token at lam 1 and lam 0 ({rows} rows x {n} new tokens)")
  return result


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bs.add_common_flags(parser, ARMS)
  args = parser.parse_args(argv)
  wanted = bs.check_common_flags(parser, args, ARMS)

  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  shape = dict(SHAPE, **(SMALL if args.small else {}))
  b, s, n = args.batch, args.prompt_len, args.new_tokens

  skipped = {}
  trl_wrapper = None
  if "trl" in wanted:
    trl_wrapper, why = load_trl_wrapper()
    if trl_wrapper is None:
      skipped["trl"] = why
      wanted.remove("trl")
      print(f"SKIPPED trl: {why}")

  with tempfile.TemporaryDirectory() as tmp:
    (ref_hf, ref_dir), (al_hf, al_dir) = hf_models(shape, tmp)
    ref_cfg, ref_p = hf.load_decoder(ref_dir)
    al_cfg, al_p = hf.load_decoder(al_dir)
  ref = base.DecoderOnlyModel(decoder.Transformer(ref_cfg))  # NO_PAD: every id a token
  al = base.DecoderOnlyModel(decoder.Transformer(al_cfg))
  prompts = np.random.default_rng(0).integers(0, shape["vocab_size"], size=(b, s))
  arms = Arms((ref, ref_p), (al, al_p), ref_hf, al_hf, prompts, trl_wrapper)

  cores = os.cpu_count()
  versions = {"jax": jax.__version__, "torch": torch.__version__}
  import transformers
  versions["transformers"] = transformers.__version__
  if trl_wrapper is not None:
    import trl
    versions["trl"] = trl.__version__
  cpu = profiling.cpu_description()
  print(f"bench_sampler_decoder: Llama {shape['num_hidden_layers']} layers, hidden "
        f"{shape['hidden_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} "
        f"q/kv heads, intermediate {shape['intermediate_size']}, vocab {shape['vocab_size']}; "
        f"batch {b}, prompt {s}, {n} new tokens, lam {LAM}, float32, "
        f"{jax.devices()[0].platform} x{cores} cores, "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", {args.rounds} rounds"
        f"\n  on {cpu}")
  report = {"config": {"batch": b, "prompt_len": s, "new_tokens": n, "rounds": args.rounds,
                       "lam": LAM, "cores": cores, "cpu": cpu,
                       "shape": shape, **versions},
            "skipped": skipped}

  report["greedy_check"] = check_greedy(arms, wanted, min(b, CHECK_ROWS), min(n, CHECK_TOKENS))

  fns = {a: (lambda a=a: getattr(arms, a)(LAM, n)) for a in wanted}
  # Warm-up: deranj's compile (a full call); torch's allocations (a 2-token call: torch
  # compiles nothing, and a full trl call takes minutes). Every output's shape is checked.
  for a in wanted:
    out = fns[a]() if a == "dera" else getattr(arms, a)(LAM, min(n, 2))
    assert out.shape == (b, n if a == "dera" else min(n, 2)), (a, out.shape)

  probes = profiling.Probes({"[B,D]x[D,F]": (b, shape["hidden_size"],
                                             shape["intermediate_size"]),
                             "[B,D]x[D,V]": (b, shape["hidden_size"], shape["vocab_size"]),
                             "prefill [B*S,D]x[D,F]": (b * s, shape["hidden_size"],
                                                       shape["intermediate_size"])},
                            megabytes=64 if args.small else 512)
  probe_rounds = []
  shapes = {}

  def checked(a):
    def run():
      shapes[a] = fns[a]().shape
    return run

  timed = {NAMES[a]: checked(a) for a in wanted}

  def probe():  # logged as it comes, so a run stopped early still has its rounds' probes
    probe_rounds.append(probes.measure())
    print("  probes: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in probe_rounds[-1].items())
          + " (GB/s, GFLOP/s)", file=sys.stderr, flush=True)

  timed["probes"] = probe
  times = profiling.interleaved_rounds(
      timed, args.rounds, log=lambda line: print(line, file=sys.stderr, flush=True))
  assert all(shape == (b, n) for shape in shapes.values()), shapes
  del times["probes"]

  probe_spread, loaded = bs.summarise_probes(probe_rounds)
  read_bw = probe_spread["read"]["median"]
  decode_rate = max(probe_spread[f"matmul {k}"]["median"] for k in ("[B,D]x[D,F]", "[B,D]x[D,V]"))
  prefill_rate = probe_spread["matmul prefill [B*S,D]x[D,F]"]["median"]
  rl = roofline(ref_cfg, models=2, rows=b, prompt_len=s, steps=n, read_bw=read_bw,
                matmul_rate=decode_rate)
  pf_bytes, pf_flops = prefill_cost(ref_cfg, models=2, rows=b, prompt_len=s)
  prefill_floor = max(pf_bytes / read_bw, pf_flops / prefill_rate)
  floor = rl["floor_s"] + prefill_floor
  memory_floor = rl["memory_floor_s"] + pf_bytes / read_bw
  binds = "memory" if 2 * rl["memory_bound_steps"] >= n else "compute"
  print(f"\nroofline per DeRa decode step (mean of {n} steps): "
        f"{rl['bytes_per_step'] / 2**20:.1f} MiB, {rl['flops_per_step'] / 1e9:.2f} GFLOP; "
        f"memory floor {rl['memory_floor_s'] / n * 1e3:.1f} ms at {read_bw / 1e9:.1f} GB/s "
        f"(streaming read), compute floor {rl['compute_floor_s'] / n * 1e3:.1f} ms at "
        f"{decode_rate / 1e9:.0f} GFLOP/s; {binds} binds ({rl['memory_bound_steps']} of {n} "
        f"steps memory-bound); decode floor {rl['floor_s'] * 1e3:.0f} ms (memory alone "
        f"{rl['memory_floor_s'] * 1e3:.0f} ms), prefill floor {prefill_floor * 1e3:.0f} ms "
        f"({pf_flops / 1e9:.0f} GFLOP at {prefill_rate / 1e9:.0f} GFLOP/s); whole-call floor "
        f"{floor:.3f} s, memory floor {memory_floor:.3f} s")
  print("  per step by part (MiB, GFLOP): " + "; ".join(
      f"{k} {v['bytes'] / 2**20:.1f}, {v['flops'] / 1e9:.3f}"
      for k, v in rl["per_step_by_part"].items()))

  arms_out = {}
  print(f"\n| run (median [min-max] of {args.rounds}) | time (s) | tokens/s | time / floor "
        f"| time / memory floor |")
  print("|---|---:|---:|---:|---:|")
  for a in wanted:
    sp = profiling.spread(times[NAMES[a]])
    arms_out[a] = dict(name=NAMES[a], times=times[NAMES[a]], time_over_floor=sp["median"] / floor,
                       time_over_memory_floor=sp["median"] / memory_floor, **sp)
    print(f"| {NAMES[a]} | {bs._fmt_spread(sp)} | {b * n / sp['median']:.0f} "
          f"| {sp['median'] / floor:.2f} | {sp['median'] / memory_floor:.2f} |")
  print(f"| floor (roofline; memory alone) | {floor:.3f} ({memory_floor:.3f}) | | | |")

  ratios = {}
  per_round = lambda num, den: [x / y for x, y in zip(times[NAMES[num]], times[NAMES[den]])]
  for other in ("hf", "trl"):
    if {"dera", other} <= set(wanted):
      ratios[f"deranj / {other} (time)"] = per_round("dera", other)
      ratios[f"{other} / deranj (speed-up)"] = per_round(other, "dera")
  if "dera" in wanted:
    ratios["deranj / floor"] = [t / floor for t in times[NAMES["dera"]]]
    ratios["deranj / memory floor"] = [t / memory_floor for t in times[NAMES["dera"]]]
  if ratios:
    print("\n| ratio (per round; median [min-max]) | value |\n|---|---:|")
    for k, v in ratios.items():
      print(f"| {k} | {bs._fmt_spread(profiling.spread(v), digits=2)} |")
  for a, why in skipped.items():
    print(f"(arm {a} skipped: {why})")
  report.update(arms=arms_out, ratios={k: dict(values=v, **profiling.spread(v))
                                        for k, v in ratios.items()},
                probes={"rounds": probe_rounds, **probe_spread}, loaded=loaded,
                roofline={"dera": rl, "prefill_floor_s": prefill_floor,
                          "prefill_bytes": pf_bytes, "prefill_flops": pf_flops,
                          "floor_s": floor, "memory_floor_s": memory_floor,
                          "read_bandwidth": read_bw, "decode_matmul_rate": decode_rate,
                          "prefill_matmul_rate": prefill_rate})
  bs._write_json(args.json, report)
  return report


if __name__ == "__main__":
  main()
