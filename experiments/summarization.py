r"""What Figures 3 and 7 share: DeRa against retrained models on summarization (paper
Sec. 5.4, App. D.3), with an offline stand-in for the human preference labels.

Stages (each training run through gin, skipped when already finished; see common.py):
  1. `sft`: SFT (configs/runs/sft.gin), the same run directory as Figure 2's;
  2. `gold_rm`: the gold reward model, configs/runs/reward_model.gin on
     GOLD_PREFERENCE_TASK for GOLD_RM_STEPS (more pairs and steps than the proxy's).
     It stands in for the human labellers and for PaLM 2 (Gao et al. 2023's synthetic
     setting): it labels the training pairs and judges the samples;
  3. `pairs/{train,validation}.jsonl`: two SFT samples per prompt of the TASK's train
     (validation) split, the one with the higher gold reward `chosen`, ties dropped;
     PreferencePair JSONL, read back as the `preference_pairs` task
     (`preference_pairs_dir.path = DIR/pairs`). The validation pairs are held out;
  4. the figure's aligned model at β and models retrained at β/λ (the driver's
     `train_aligned`), from the SFT model on those pairs;
  5. one DeRa sweep over the λ grid from (SFT, aligned) on held-out (test) prompts, one
     compiled sampler; samples of SFT and of every retrained model; importance-resampled
     DeRa (the exact sequence-level mixture);
  6. judges: the gold reward model (with the random position swap of App. D.3) and
     ROUGE-L against the references. Win rates with 95% intervals (a) against SFT,
     (b) against the β model, (c) DeRa against the model retrained at the same λ; eq. 14
     pairwise accuracy of every DeRa and retrained model on the held-out pairs;
  7. `figN.json` and `figN.png`.
"""
from __future__ import annotations

import argparse
import functools
import os
from typing import Callable, Optional, Sequence

from experiments import common

common.setup_path()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deranj import dera  # noqa: E402
from deranj import profiling  # noqa: E402
from deranj import rewards  # noqa: E402
from deranj.data import batching  # noqa: E402
from deranj.data import pipeline  # noqa: E402
from deranj.data import preferences  # noqa: E402
from deranj.data import tasks  # noqa: E402
from deranj.data import tokenizer  # noqa: E402
from deranj.evaluation import judges  # noqa: E402
from deranj.evaluation import win_rates  # noqa: E402
from deranj.models import base as models_base  # noqa: E402

PAPER_LAMS = "0.5,0.6667,1,2,5,10"  # the paper's grid (Sec. 5.4)
# Per preset: the λ grid (smoke: three points, so CI trains two retrained models), held-out
# prompts and samples per prompt and λ, SIR candidates, rows per sampler call, and the
# prompts whose SFT sample pairs become the training (validation) preference pairs.
GRIDS = {
    "smoke": dict(lams="0.5,2", prompts=4, samples=2, candidates=4, chunk=32,
                  pair_prompts=24, val_pair_prompts=8),
    "tiny": dict(lams=PAPER_LAMS, prompts=42, samples=4, candidates=8, chunk=128,
                 pair_prompts=600, val_pair_prompts=42),
    "paper": dict(lams=PAPER_LAMS, prompts=1000, samples=1, candidates=16, chunk=512,
                  pair_prompts=50000, val_pair_prompts=1000),
}
RM_RUN = "configs/runs/reward_model.gin"
PAIRS = "pairs"
METHODS = ("dera", "retrained", "dera_resampled")
JUDGES = ("gold", "rouge_l")


class Context:
  """What a driver's `train_aligned` needs: the preset, the work directory, the runs."""

  def __init__(self, preset: str, workdir: str):
    self.preset = preset
    self.workdir = workdir
    self.sft_dir = common.run_dir(workdir, "sft")
    self.gold_dir = common.run_dir(workdir, "gold_rm")
    self.pairs_dir = os.path.join(workdir, PAIRS)

  def pair_bindings(self) -> list[str]:
    """The `preference_pairs` task over this work directory's labelled pairs."""
    return ["PREFERENCE_TASK = 'preference_pairs'",
            f"preference_pairs_dir.path = '{self.pairs_dir}'"]


# ----------------------------------------------------------------------------- pairs


def label_pairs(prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], scores_a, scores_b
                ) -> list[preferences.PreferencePair]:
  """Pairs of responses -> PreferencePairs, the higher-scored response `chosen`.

  Pairs with equal scores or identical texts carry no preference and are dropped.
  """
  scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if not len(prompts) == len(responses_a) == len(responses_b) == len(scores_a) == len(
      scores_b):
    raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} and {len(responses_b)} "
                     f"responses, {len(scores_a)} and {len(scores_b)} scores: give one "
                     "of each per pair.")
  pairs = []
  for x, a, b, sa, sb in zip(prompts, responses_a, responses_b, scores_a, scores_b):
    if a == b or sa == sb:
      continue
    chosen, rejected = (a, b) if sa > sb else (b, a)
    pairs.append(preferences.PreferencePair(prompt=x, chosen=chosen, rejected=rejected))
  return pairs


def documents(split: pipeline.Split) -> list[str]:
  """The raw prompts of a summarization split (the task adds the prefix back)."""
  return [x[len(tasks.PREFIX):] if x.startswith(tasks.PREFIX) else x
          for x in split.texts["inputs"]]


def decode_all(tokens: np.ndarray) -> list[str]:
  return [tokenizer.decode(row) for row in np.asarray(tokens)]


def make_pairs(ctx: Context, macros: dict, grid: dict, sft, gold: judges.RewardModelJudge,
               rng: jax.Array) -> dict:
  """Writes DIR/pairs/{train,validation}.jsonl unless both exist; returns their sizes."""
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": macros["TARGETS_LENGTH"]}
  model, params = sft
  stats = {}
  for i, (split, size) in enumerate((("train", grid["pair_prompts"]),
                                     ("validation", grid["val_pair_prompts"]))):
    path = os.path.join(ctx.pairs_dir, f"{split}.jsonl")
    if os.path.isfile(path):
      stats[split] = {"pairs": len(preferences.read_pairs(path)), "reused": True}
      continue
    data = pipeline.load(macros["TASK"], split, lengths, max_examples=size)
    prompts = data.features["encoder_input_tokens"]
    # Two samples per prompt, rows prompt-major: a = even rows, b = odd rows.
    tokens = common.sample_model(model, params, prompts, 2, grid["chunk"],
                          macros["TARGETS_LENGTH"], jax.random.fold_in(rng, i))
    scores = gold.rewards(np.repeat(prompts, 2, axis=0), tokens)
    texts = decode_all(tokens)
    pairs = label_pairs(documents(data), texts[0::2], texts[1::2], scores[0::2], scores[1::2])
    if not pairs:
      raise RuntimeError(f"no {split} preference pairs: all {len(prompts)} SFT sample "
                         "pairs tied under the gold reward model.")
    os.makedirs(ctx.pairs_dir, exist_ok=True)
    preferences.write_pairs(path, pairs)
    stats[split] = {"prompts": int(len(prompts)), "pairs": len(pairs),
                    "mean_abs_gold_margin": float(np.mean(np.abs(scores[0::2] - scores[1::2])))}
  return stats


# ----------------------------------------------------------------------------- sampling


# ----------------------------------------------------------------------------- eq. 14


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logps(model: models_base.EncoderDecoderModel, params, enc, targets):
  return model.sequence_logprobs(params, enc, targets)


def model_pairwise_accuracy(model, params, pairs: dict, batch_size: int) -> float:
  """Eq. 14 of one model on held-out pairs, the same convention as
  `win_rates.realigned_pairwise_accuracy` (lengths count non-PAD tokens, EOS included)."""
  logps = {side: batching.map_in_fixed_batches(
      functools.partial(_sequence_logps, model, params),
      (pairs["encoder_input_tokens"], pairs[f"{side}_decoder_target_tokens"]), batch_size)
            for side in ("chosen", "rejected")}
  return win_rates.pairwise_accuracy(
      logps["chosen"], (pairs["chosen_decoder_target_tokens"] > 0).sum(1),
      logps["rejected"], (pairs["rejected_decoder_target_tokens"] > 0).sum(1))


# ----------------------------------------------------------------------------- judging


class Judging:
  """Both judges on one set of held-out prompts; outcomes for the first response."""

  def __init__(self, gold: judges.RewardModelJudge, prompts: np.ndarray,
               references: Sequence[str], seed: int):
    self.gold, self.prompts, self.references = gold, prompts, list(references)
    self.seed = seed
    self._calls = 0

  def _rng(self) -> np.random.Generator:
    self._calls += 1  # fresh swaps per comparison, reproducible from the seed
    return np.random.default_rng([self.seed, self._calls])

  def compare(self, tokens_a: np.ndarray, tokens_b: np.ndarray) -> dict:
    """{judge: WinRate dict} of A against B, row i of each on the same prompt."""
    gold = judges.judge_with_position_swap(lambda a, b, x: self.gold(x, a, b), tokens_a,
                                           tokens_b, self.prompts, rng=self._rng())
    rouge = judges.judge_with_position_swap(judges.rouge_l_judge, decode_all(tokens_a),
                                            decode_all(tokens_b), self.references,
                                            rng=self._rng())
    return {"gold": win_rates.win_rate(gold).to_dict(),
            "rouge_l": win_rates.win_rate(rouge).to_dict()}

  def describe(self, tokens: np.ndarray) -> dict:
    lengths = np.asarray(rewards.response_lengths(tokens))
    return {"mean_gold_reward": float(self.gold.rewards(self.prompts, tokens).mean()),
            "mean_length": float(lengths.mean())}


# ----------------------------------------------------------------------------- plot


def plot(result: dict, path: str) -> None:
  """Row per judge: (a) vs SFT, (b) vs the β model, (c) vs the retrained model at the same
  λ; (d) eq. 14 pairwise accuracy. DeRa ■, retrained ▲, red line at the β model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result["per_lam"]
  lams = [r["lam"] for r in rows]
  beta_row = next(r for r in rows if r["lam"] == 1)
  styles = {"dera": ("s-", "DeRa", "C0"), "retrained": ("^--", "retrained", "C1"),
            "dera_resampled": ("o:", "DeRa + SIR (exact mixture)", "C2")}
  fig, axes = plt.subplots(2, 4, figsize=(20, 9.2), gridspec_kw={"wspace": 0.3, "hspace": 0.3})

  def curve(ax, method, get, **kwargs):
    values = [get(r[method]) for r in rows]
    if isinstance(values[0], dict):  # a WinRate: error bars from its interval
      y = [v["rate"] for v in values]
      err = [[v["rate"] - v["low"] for v in values], [v["high"] - v["rate"] for v in values]]
      ax.errorbar(lams, y, yerr=err, fmt=styles[method][0], capsize=3,
                  label=styles[method][1], color=styles[method][2], **kwargs)
    else:
      ax.plot(lams, values, styles[method][0], label=styles[method][1],
              color=styles[method][2], **kwargs)

  for row, judge in enumerate(JUDGES):
    name = "gold reward model" if judge == "gold" else "ROUGE-L"
    panels = (("vs_sft", "(a) vs SFT", beta_row["retrained"][judge]["vs_sft"]["rate"]),
              ("vs_beta", "(b) vs π(β)", 0.5),
              ("vs_retrained", "(c) DeRa vs retrained π(β/λ)", 0.5))
    for col, (key, title, red) in enumerate(panels):
      ax = axes[row, col]
      for method in METHODS:
        if key == "vs_retrained" and method == "retrained":
          continue
        curve(ax, method, lambda m, key=key, judge=judge: m[judge][key],
              alpha=0.6 if method == "dera_resampled" else 1.0)
      ax.axhline(red, color="red", linewidth=1)
      ax.set_title(f"{title}; judge: {name}", fontsize=10)
      ax.set_ylabel("win rate (95% CI)")
  ax = axes[0, 3]
  for method in ("dera", "retrained"):
    curve(ax, method, lambda m: m["pairwise_accuracy"])
  ax.axhline(beta_row["retrained"]["pairwise_accuracy"], color="red", linewidth=1)
  ax.set_title("(d) eq. 14 pairwise accuracy, held-out pairs", fontsize=10)
  ax.set_ylabel("pairwise accuracy")
  axes[1, 3].axis("off")
  for ax in axes.flat:
    if ax.has_data():
      ax.set_xscale("log")
      ax.set_xticks(lams, [f"{x:.2g}" for x in lams], fontsize=8)
      ax.minorticks_off()
      ax.set_xlabel("λ (retrained at β/λ)")
      ax.legend(fontsize=8)
  fig.suptitle(f"Figure {result['figure']}: DeRa vs retrained, {result['aligner']}, "
               f"β = {result['beta']:g} ({result['preset']} preset)")
  common.save_figure(fig, path)
  plt.close(fig)


# ----------------------------------------------------------------------------- driver


def parse_args(argv: Optional[Sequence[str]], description: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--preset", choices=sorted(GRIDS), default="tiny")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lams", default=None,
                      help="comma-separated λ grid (1 is added); default: the preset's")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def run(figure: str, aligner: str, kind: str, argv: Optional[Sequence[str]], description: str,
        train_aligned: Callable[[Context, float], bool],
        prepare: Optional[tuple[str, Callable[[Context], bool]]] = None) -> dict:
  """Runs a figure end to end and returns what it writes to figN.json.

  Args:
    figure, aligner: "3", "policy gradient": names in the outputs.
    kind: the aligned runs' directory prefix (`common.run_dir(workdir, kind, beta)`).
    argv: command-line arguments (None: sys.argv).
    description: --help's.
    train_aligned: `train_aligned(ctx, beta)` trains the aligned model at `beta` from
      the SFT model, or skips it when finished (returns `common.train`'s bool).
    prepare: (stage name, fn(ctx) -> bool): a training run after the pairs and before
      the aligned models (Figure 3's proxy reward model).
  """
  args = parse_args(argv, description)
  grid = GRIDS[args.preset]
  lams = common.parse_lams(args.lams or grid["lams"], add_one=True)
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  ctx = Context(args.preset, workdir)
  macros = common.preset_macros(args.preset, ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH"])
  max_len = macros["TARGETS_LENGTH"]
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": max_len}
  timer = common.Timer()
  rng = jax.random.PRNGKey(args.seed)
  trained = []

  with timer("sft"):
    trained.append(common.train("configs/runs/sft.gin", args.preset, ctx.sft_dir))
  with timer("gold_rm"):
    trained.append(common.train(RM_RUN, args.preset, ctx.gold_dir, [
        f"INIT_CHECKPOINT = '{ctx.sft_dir}'", "PREFERENCE_TASK = %GOLD_PREFERENCE_TASK",
        "RM_STEPS = %GOLD_RM_STEPS"]))
  from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
  gold = judges.RewardModelJudge(*reward_model.load_reward_model(ctx.gold_dir),
                                 batch_size=grid["chunk"])
  ref, sft_params = common.load_policy(ctx.sft_dir)
  with timer("pairs"):
    pair_stats = make_pairs(ctx, macros, grid, (ref, sft_params), gold,
                            jax.random.fold_in(rng, 100))
  if prepare:
    with timer(prepare[0]):
      trained.append(prepare[1](ctx))
  with timer("aligned"):
    trained.append(train_aligned(ctx, args.beta))
  with timer("retrained"):
    for lam in lams:
      if lam != 1:
        trained.append(train_aligned(ctx, args.beta / lam))

  test = pipeline.load(macros["TASK"], "test", lengths, max_examples=grid["prompts"])
  prompts = test.features["encoder_input_tokens"]
  samples = grid["samples"]
  _, aligned_params = common.load_policy(common.run_dir(workdir, kind, args.beta))
  realigner = dera.Realigner(ref, sft_params, ref, aligned_params, max_decode_len=max_len)

  # The filter is a jitted function's name: DeRa's sampler.
  with timer("dera_sweep"), profiling.count_compiles("_sample_logit_mixed") as compiles:
    dera_tokens, _ = common.sample_dera(realigner, prompts, lams, samples, grid["chunk"],
                                 jax.random.fold_in(rng, 0))
  with timer("dera_resampled"):
    sir_tokens, ess = common.sample_dera(realigner, prompts, lams, samples, grid["chunk"],
                                  jax.random.fold_in(rng, 1), candidates=grid["candidates"])
  with timer("retrained_sampling"):
    sft_tokens = common.sample_model(ref, sft_params, prompts, samples, grid["chunk"], max_len,
                              jax.random.fold_in(rng, 3))
    retrained_params = [aligned_params if lam == 1 else common.load_policy(
        common.run_dir(workdir, kind, args.beta / lam))[1] for lam in lams]
    retrained_tokens = np.stack([
        common.sample_model(ref, params, prompts, samples, grid["chunk"], max_len,
                     jax.random.fold_in(rng, 2)) for params in retrained_params])
  tokens = {"dera": dera_tokens, "retrained": retrained_tokens, "dera_resampled": sir_tokens}

  with timer("pairwise_accuracy"):
    pairs_task = f"fig{figure}_pairs"
    tasks.register_preference_pairs(pairs_task, ctx.pairs_dir)
    held_out = pipeline.load(pairs_task, "validation", lengths).features
    pair_batch = min(grid["chunk"], len(held_out["encoder_input_tokens"]))
    dera_acc = win_rates.realigned_pairwise_accuracy(
        realigner, held_out["encoder_input_tokens"], held_out["chosen_decoder_target_tokens"],
        held_out["rejected_decoder_target_tokens"], lams, pair_batch)
    retrained_acc = [model_pairwise_accuracy(ref, p, held_out, pair_batch)
                     for p in retrained_params]
    sft_acc = model_pairwise_accuracy(ref, sft_params, held_out, pair_batch)

  with timer("judging"):
    references = np.repeat(np.asarray(test.texts["targets"], object), samples).tolist()
    judging = Judging(gold, np.repeat(prompts, samples, axis=0), references, args.seed)
    beta_tokens = retrained_tokens[lams.index(1.0)]
    per_lam = []
    for i, lam in enumerate(lams):
      row = {"lam": lam, "beta_over_lam": args.beta / lam}
      for method in METHODS:
        m = tokens[method][i]
        vs_sft, vs_beta = judging.compare(m, sft_tokens), judging.compare(m, beta_tokens)
        vs_ret = (judging.compare(m, retrained_tokens[i]) if method != "retrained" else None)
        row[method] = {
            judge: {"vs_sft": vs_sft[judge], "vs_beta": vs_beta[judge],
                    **({"vs_retrained": vs_ret[judge]} if vs_ret else {})}
            for judge in JUDGES}
        row[method].update(judging.describe(m))
      row["dera"]["pairwise_accuracy"] = dera_acc[float(lam)]
      row["retrained"]["pairwise_accuracy"] = retrained_acc[i]
      # eq. 14 needs normalised log-probabilities; the exact mixture's normaliser is
      # unknown, so resampled DeRa has no pairwise accuracy.
      row["dera_resampled"]["pairwise_accuracy"] = None
      row["dera_resampled"]["mean_ess"] = float(ess[i].mean())
      row["dera_resampled"]["num_candidates"] = grid["candidates"]
      per_lam.append(row)

  def rates(method, judge, key):
    return [r[method][judge][key]["rate"] for r in per_lam]

  agreement = {}
  for judge in JUDGES:
    for key in ("vs_sft", "vs_beta"):
      agreement[f"{judge}/{key}"] = common.agreement(
          lams, rates("dera", judge, key), rates("retrained", judge, key))
      agreement[f"{judge}/{key}/resampled"] = common.agreement(
          lams, rates("dera_resampled", judge, key), rates("retrained", judge, key))
  agreement["pairwise_accuracy"] = common.agreement(
      lams, [dera_acc[float(x)] for x in lams], retrained_acc)
  picked = {m: float(lams[int(np.argmax(rates(m, "gold", "vs_sft")))]) for m in METHODS}
  result = {
      "figure": figure, "aligner": aligner, "preset": args.preset, "beta": args.beta,
      "lams": lams, "seed": args.seed, "num_prompts": int(len(prompts)),
      "samples_per_prompt": samples, "pairs": pair_stats,
      "held_out_pairs": int(len(held_out["encoder_input_tokens"])),
      "sft": {**judging.describe(sft_tokens), "pairwise_accuracy": sft_acc},
      "per_lam": per_lam,
      "agreement": agreement,
      "lam_picked": {"by": "gold judge, win rate against SFT", **picked},
      "dera_sweep_compiles": compiles.count,
      "trained_runs": int(sum(bool(t) for t in trained)),
      "wall_seconds": timer.seconds,
  }
  json_path = os.path.join(workdir, f"fig{figure}.json")
  png_path = os.path.join(workdir, f"fig{figure}.png")
  common.write_json(json_path, result)
  plot(result, png_path)
  report(result)
  common.log(f"figure: {png_path}\nnumbers: {json_path}")
  return result


def report(result: dict) -> None:
  """A markdown table of the gold judge's win rates and eq. 14 accuracies."""
  common.log("\n| λ | β/λ | DeRa vs SFT | retrained vs SFT | SIR vs SFT | DeRa vs π(β) | "
             "retrained vs π(β) | DeRa vs retrained | acc DeRa | acc retrained |\n"
             "|---|---|---|---|---|---|---|---|---|---|")
  for r in result["per_lam"]:
    g = lambda m, k: r[m]["gold"][k]["rate"]  # noqa: E731
    common.log(f"| {r['lam']:.4g} | {r['beta_over_lam']:.4g} | {g('dera', 'vs_sft'):.2f} | "
               f"{g('retrained', 'vs_sft'):.2f} | {g('dera_resampled', 'vs_sft'):.2f} | "
               f"{g('dera', 'vs_beta'):.2f} | {g('retrained', 'vs_beta'):.2f} | "
               f"{g('dera', 'vs_retrained'):.2f} | {r['dera']['pairwise_accuracy']:.2f} | "
               f"{r['retrained']['pairwise_accuracy']:.2f} |")
  agree = result["agreement"]["gold/vs_sft"]
  common.log(f"\ngold judge vs SFT: Spearman ρ(DeRa, retrained) = {common.spearman_text(agree)}, "
             f"mean |Δ| = {agree['mean_abs_difference']:.3f}; λ picked: "
             f"{ {k: v for k, v in result['lam_picked'].items() if k != 'by'} }; "
             f"trained {result['trained_runs']} runs; "
             f"wall {sum(result['wall_seconds'].values()):.0f} s")
