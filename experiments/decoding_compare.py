r"""Decoding-time methods compared on the Figure 7 setting: greedy SFT and DPO, DeRa at the
λ a validation split picks, alignment-aware decoding (AAD), best-of-N by the proxy reward
model and by the DPO implicit reward, EFT where it applies; then AAD's data loop.

    python experiments/decoding_compare.py --preset tiny --workdir /tmp/deranj/figs

Given the same --workdir and preset as experiments/fig7_dpo.py (and fig3's proxy reward
model), every training run below is the same run, skipped when finished:
  1. `sft`, `gold_rm`, `pairs/` (stages.py), `proxy_rm` (Figure 3's), `dpo_beta<β>`
     (Figure 7's aligned model);
  2. DeRa, greedy (temperature 0), over the λ grid (SUMMARIZATION_LAMS and 1, or --lams)
     on COMPARE_VAL_PROMPTS prompts of the validation split, one compiled sampler; λ
     picked by the mean gold reward there;
  3. the arms on the held-out test prompts (SUMMARIZATION_PROMPTS), one output each:
     greedy SFT, greedy DPO, greedy DeRa at the picked λ, AAD (greedy) at every
     COMPARE_ALPHAS value in one pass with a per-row alpha (alpha = 1 rides along as a
     check: it is greedy DPO), best-of-N for N in COMPARE_BEST_OF (candidates from the DPO
     model at temperature 1 in one call with num_decodes=N, the same candidates for both
     scorers), EFT recorded as not applicable (EFT_REASON);
  4. per arm: gold-judge win rate against greedy DPO (random position swap; 95% interval
     from a bootstrap over prompts), mean gold reward, ROUGE-L F1 against the
     references, mean length, and decode seconds per output relative to greedy DPO;
  5. the data loop: on the PAIR_PROMPTS training prompts AAD (alpha 0.1) outputs as
     chosen and greedy DPO outputs as rejected (`aad_pairs/`; identical pairs dropped from
     training) -> `dpo2_aad_beta<β>`, a second DPO round (configs/runs/dpo.gin) started
     from the first DPO model, which is also its reference, as in iterated DPO -> its
     greedy outputs judged against the first DPO model's;
  6. decoding_compare.json, decoding_compare.png and a markdown table.

Timing: each arm decodes its outputs in calls of at most min(FIG_CHUNK, prompts) rows
(best-of-N: that many candidate rows, at least N), after one untimed call on the first
batch, which compiles. Seconds are the wall time of the whole pass, scoring included:
read the ratios to greedy DPO (same process, same batch shapes), and only from a run on
an otherwise idle machine.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top

common.setup_path()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deranj import decoding  # noqa: E402
from deranj import dera  # noqa: E402
from deranj import profiling  # noqa: E402
from deranj import text_metrics  # noqa: E402
from deranj.data import batching  # noqa: E402
from deranj.data import pipeline  # noqa: E402
from deranj.data import preferences  # noqa: E402
from deranj.evaluation import judges  # noqa: E402
from experiments import fig3_policy_gradient  # noqa: E402
from experiments import fig7_dpo  # noqa: E402
from experiments import judging  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import stages  # noqa: E402
from experiments import summarization  # noqa: E402

BASELINE = "greedy_dpo"
LOOP_ALPHA = 0.1  # the AAD paper's setting for its data loop
LOOP_PAIRS = "aad_pairs"
LOOP_KIND = "dpo2_aad"
BEST_OF = 200  # the candidates' stream of the driver's seed (stages uses 0-3, 100, 101)
EFT_REASON = (
    "EFT steers a larger base model with a small (SFT, DPO) pair of the same vocabulary; "
    "this setting has one pretrained model, the shipped 2.8M tiny T5 (vocabulary 4096), "
    "and the larger configs (configs/models/t5_small..large.gin) use T5's 32k vocabulary. "
    "With the SFT model as the base the EFT mixture h_sft + h_dpo - h_sft is greedy DPO.")
LOOP_RULE = (f"chosen: AAD (alpha {LOOP_ALPHA}, greedy) output; rejected: the first DPO "
             "model's greedy output; training pairs whose two outputs are identical dropped")


# ----------------------------------------------------------------------------- helpers


def calls_of(rows: int, per_prompt: int, num_prompts: int) -> int:
  """Prompts per call: `rows` candidate rows a call at most (at least one prompt), never
  more prompts than there are."""
  return int(max(1, min(num_prompts, rows // per_prompt)))


def identical_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N] bool: row i of two token arrays [N, T] equal."""
  return np.all(np.asarray(a) == np.asarray(b), axis=1)


def pick_lam(lams: Sequence[float], values: Sequence[float]) -> float:
  """The λ with the highest value; ties go to the λ closest to 1 (the DPO model) on a log
  scale, then to the smaller (closer to SFT)."""
  values = np.asarray(values, np.float64)
  best = np.flatnonzero(values == values.max())
  return float(min((lams[i] for i in best), key=lambda lam: (abs(np.log(lam)), lam)))


def loop_pairs(documents: Sequence[str], prompts: np.ndarray, chosen: np.ndarray,
               rejected: np.ndarray, drop_identical: bool
               ) -> tuple[list[preferences.PreferencePair], int]:
  """(PreferencePairs of chosen/rejected token rows with their sampled ids, how many were
  identical); identical ones are left out with `drop_identical`."""
  same = identical_rows(chosen, rejected)
  texts = (stages.decode_all(chosen), stages.decode_all(rejected))
  pairs = [preferences.PreferencePair(
      prompt=documents[i], chosen=texts[0][i], rejected=texts[1][i],
      prompt_ids=preferences.sampled_ids(prompts[i]),
      chosen_ids=preferences.sampled_ids(chosen[i]),
      rejected_ids=preferences.sampled_ids(rejected[i]))
           for i in range(len(documents)) if not (drop_identical and same[i])]
  return pairs, int(same.sum())


def timed_decode(fn: Callable, arrays: Sequence[np.ndarray], per_call: int, label: str
                 ) -> tuple:
  """(fn's outputs over every row, seconds for the pass): `fn(chunk_number, *batch)` over
  [per_call] batches of `arrays`, timed after one untimed (compiling) call on the first."""
  first = batching.fixed_size_chunks(len(arrays[0]), per_call)[0]
  jax.block_until_ready(fn(0, *(np.asarray(a)[first.rows] for a in arrays)))
  start = time.perf_counter()
  out = batching.map_in_fixed_batches(fn, arrays, per_call, pass_number=True)
  seconds = time.perf_counter() - start
  common.log(f"   {label}: {seconds:.2f} s for {len(arrays[0])} rows")
  return out, seconds


# ----------------------------------------------------------------------------- driver


def parse_settings(preset: str, macros: dict) -> dict:
  """The preset's COMPARE_* macros, checked (one line naming the preset file when bad)."""
  flag = f"{common.PRESET_FILES[preset]}: "
  try:
    alphas = dera.parse_alphas(",".join(map(repr, map(float, macros["COMPARE_ALPHAS"]))),
                               flag=flag + "COMPARE_ALPHAS")
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  best_of = [int(n) for n in macros["COMPARE_BEST_OF"]]
  if not best_of or min(best_of) < 1 or len(set(best_of)) != len(best_of):
    raise SystemExit(f"error: {flag}COMPARE_BEST_OF = {macros['COMPARE_BEST_OF']}: give "
                     "distinct candidate counts >= 1.")
  return {"alphas": sorted(alphas), "best_of": sorted(best_of),
          "val_prompts": int(macros["COMPARE_VAL_PROMPTS"])}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = summarization.parse_args(argv, __doc__.split("\n")[0])
  if args.seeds is not None:
    raise SystemExit("error: --seeds: decoding_compare.py compares the methods for one "
                     "seed; give --seed.")
  grid = stages.read_grid(args.preset, "SUMMARIZATION", args.lams)
  macros = common.preset_macros(args.preset, [
      "TASK", "INPUTS_LENGTH", "TARGETS_LENGTH", "COMPARE_ALPHAS", "COMPARE_BEST_OF",
      "COMPARE_VAL_PROMPTS"])
  settings = parse_settings(args.preset, macros)
  max_len = macros["TARGETS_LENGTH"]
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": max_len}
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  # sft, gold_rm, proxy_rm, dpo at β, the second DPO round.
  ctx = stages.Context(args.preset, workdir, stages.Runs(5))
  timer, rng, trained = common.Timer(), jax.random.PRNGKey(args.seed), []
  gold, (ref, sft_params), pair_stats = summarization.base_stages(
      ctx, macros, grid, timer, rng, args.seed, trained)
  with timer("proxy_rm"):
    trained.append(fig3_policy_gradient.train_proxy(ctx))
  with timer("aligned"):
    trained.append(fig7_dpo.train_aligned(ctx, args.beta))
  from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
  proxy = judges.RewardModelJudge(
      *reward_model.load_reward_model(fig3_policy_gradient.proxy_dir(ctx)),
      batch_size=grid.chunk)
  dpo_dir = common.run_dir(workdir, fig7_dpo.KIND, args.beta)
  dpo_params = common.load_policy(dpo_dir)[1]
  realigner = dera.Realigner(ref, sft_params, ref, dpo_params, max_decode_len=max_len)

  test = pipeline.load(macros["TASK"], "test", lengths, max_examples=grid.prompts)
  prompts = test.features["prompts"]
  num = len(prompts)
  rows = min(grid.chunk, num)  # rows per sampler call, every arm alike

  def greedy(params):
    return lambda i, enc: decoding.sample(ref, params, enc, jax.random.PRNGKey(0),
                                          max_decode_len=max_len, temperature=0.0).tokens

  def dera_greedy(i, enc, lam):
    return realigner.sample(enc, lam, temperature=0.0).tokens

  def aad_greedy(i, enc, alpha):
    return realigner.sample(enc, rule="aad", alpha=alpha, temperature=0.0).tokens

  # ---- DeRa's λ on the validation split.
  with timer("validation"):
    val = pipeline.load(macros["TASK"], "validation", lengths,
                        max_examples=settings["val_prompts"])
    val_prompts = val.features["prompts"]
    lams = grid.lams
    lam_rows = np.tile(np.asarray(lams, np.float32), len(val_prompts))
    val_tokens = batching.map_in_fixed_batches(
        dera_greedy, (np.repeat(val_prompts, len(lams), axis=0), lam_rows), rows,
        pass_number=True).reshape(len(val_prompts), len(lams), max_len)
    val_rewards = [float(gold.rewards(val_prompts, val_tokens[:, k]).mean())
                   for k in range(len(lams))]
    lam = pick_lam(lams, val_rewards)
    val_dpo = batching.map_in_fixed_batches(greedy(dpo_params), (val_prompts,), rows,
                                            pass_number=True)
    common.log(f"   λ picked on {len(val_prompts)} validation prompts: {lam:g}")
  validation = {
      "num_prompts": int(len(val_prompts)), "picked_by": "mean gold reward, greedy DeRa",
      "per_lam": [{"lam": x, "mean_gold_reward": r} for x, r in zip(lams, val_rewards)],
      "lam_picked": lam,
      # Checks: greedy DeRa at λ = 1 runs both models and weighs the SFT model by 0.
      "dera_lam1_matches_greedy_dpo": float(identical_rows(
          val_tokens[:, lams.index(1.0)], val_dpo).mean()),
  }

  # ---- The arms on the test prompts.
  outputs, seconds, details = {}, {}, {}
  with timer("arms"):
    for name, params in (("greedy_sft", sft_params), (BASELINE, dpo_params)):
      outputs[name], seconds[name] = timed_decode(greedy(params), (prompts,), rows, name)
    name = f"dera_lam{lam:g}"
    outputs[name], seconds[name] = timed_decode(
        lambda i, enc: dera_greedy(i, enc, np.float32(lam)), (prompts,), rows, name)
    details[name] = {"lam": lam, "lam_picked_by": validation["picked_by"]}

    # AAD: every alpha (and alpha = 1, the check) one row per prompt, one pass.
    alphas = settings["alphas"] + ([] if 1.0 in settings["alphas"] else [1.0])
    with profiling.count_compiles("_sample_logit_mixed") as aad_compiles:
      sweep, sweep_seconds = timed_decode(
          aad_greedy, (np.repeat(prompts, len(alphas), axis=0),
                       np.tile(np.asarray(alphas, np.float32), num)), rows, "aad sweep")
    sweep = sweep.reshape(num, len(alphas), max_len)
    for k, alpha in enumerate(settings["alphas"]):
      name = f"aad_alpha{alpha:g}"
      outputs[name] = sweep[:, k]
      seconds[name] = sweep_seconds / len(alphas)  # the pass's seconds per row, x num
      details[name] = {"alpha": alpha, "timing": "the alpha sweep's seconds per row"}
    aad_alpha1 = sweep[:, alphas.index(1.0)]

    candidates = {}
    for n in settings["best_of"]:
      key = jax.random.fold_in(jax.random.fold_in(rng, BEST_OF), n)
      per_call = calls_of(rows, n, num)
      for scorer_name, scorer in (("proxy_rm", lambda x, s: proxy.rewards(x, s.tokens)),
                                  ("implicit", dera.implicit_reward_scorer(args.beta))):
        def best(i, enc, n=n, key=key, scorer=scorer):
          out = realigner.best_of_n(enc, n, scorer, jax.random.fold_in(key, i), lam=1.0)
          return out.samples.tokens, out.scores
        name = f"best_of{n}_{scorer_name}"
        (outputs[name], candidates[name]), seconds[name] = timed_decode(
            best, (prompts,), per_call, name)
        details[name] = {"n": n, "scorer": scorer_name, "prompts_per_call": per_call}

  with timer("checks"):  # the chosen outputs scored again, on their own
    for name, scores in candidates.items():
      tokens = outputs[name]
      if details[name]["scorer"] == "proxy_rm":
        rescored = proxy.rewards(prompts, tokens)
        scale = np.abs(rescored)
      else:  # teacher-forced log-probabilities: DeRa at lam 1 is the DPO model, 0 the SFT
        logp, logp_ref = (batching.map_in_fixed_batches(
            lambda enc, tok, x=x: realigner.score(enc, tok, x), (prompts, tokens), rows)
                          for x in (1.0, 0.0))
        rescored = args.beta * (logp - logp_ref)
        scale = args.beta * (np.abs(logp) + np.abs(logp_ref))
      details[name]["check"] = {"candidate_max": scores.max(axis=1),
                                "chosen_rescored": rescored, "scale": scale}
      details[name]["mean_best_score"] = float(scores.max(axis=1).mean())

  # ---- Judging.
  references = list(test.texts["targets"])
  judge = judging.Judging(gold, prompts, references, args.seed, 1, args.bootstrap_resamples)

  def measure(tokens, baseline_tokens):
    vs = judge.compare(tokens, baseline_tokens)
    return {"gold": vs["gold"], "rouge_l_judge": vs["rouge_l"], **judge.describe(tokens),
            "rouge_l": text_metrics.rouge_scores(stages.decode_all(tokens),
                                                 references)["rougeL"]}

  with timer("judging"):
    arms = []
    for name, tokens in outputs.items():
      per_seq = seconds[name] / num
      arms.append({"name": name, **details.get(name, {}),
                   **measure(tokens, outputs[BASELINE]),
                   "seconds_per_sequence": per_seq,
                   "relative_time": per_seq / (seconds[BASELINE] / num)})

  # ---- The data loop.
  with timer("data_loop"):
    train = pipeline.load(macros["TASK"], "train", lengths, max_examples=grid.pair_prompts)
    pair_stats_loop = make_loop_pairs(
        os.path.join(workdir, LOOP_PAIRS), {"train": train, "validation": val},
        lambda enc: batching.map_in_fixed_batches(
            lambda i, e: aad_greedy(i, e, np.float32(LOOP_ALPHA)), (enc,), rows,
            pass_number=True),
        lambda enc: batching.map_in_fixed_batches(greedy(dpo_params), (enc,), rows,
                                                  pass_number=True))
    loop = {"rule": LOOP_RULE, "pairs": pair_stats_loop, "run": None,
            "init_and_reference": dpo_dir}
    if pair_stats_loop["train"]["pairs"]:
      loop["run"] = common.run_dir(workdir, LOOP_KIND, args.beta)
      trained.append(ctx.train(fig7_dpo.RUN, loop["run"], [
          f"INIT_CHECKPOINT = '{dpo_dir}'", "PREFERENCE_TASK = 'preference_pairs'",
          f"preference_pairs_dir.path = '{os.path.join(workdir, LOOP_PAIRS)}'",
          f"BETA = {args.beta}"]))
      round2 = common.load_policy(loop["run"])[1]
      tokens, loop_seconds = timed_decode(greedy(round2), (prompts,), rows, "greedy round 2")
      loop["greedy_vs_first_dpo"] = {**measure(tokens, outputs[BASELINE]),
                                     "relative_time": loop_seconds / seconds[BASELINE]}
    else:
      loop["skipped"] = "every AAD training output equals greedy DPO's: no pair to learn from"

  result = {
      "preset": args.preset, "beta": args.beta, "seed": args.seed, "num_prompts": num,
      "baseline": BASELINE, "lams": lams, "alphas": settings["alphas"],
      "best_of": settings["best_of"], "pairs": pair_stats, "validation": validation,
      "arms": arms,
      "eft": {"applicable": False, "reason": EFT_REASON},
      "checks": {
          "aad_alpha1_matches_greedy_dpo": float(identical_rows(aad_alpha1,
                                                                outputs[BASELINE]).mean()),
          "aad_sweep_compiles": aad_compiles.count,
      },
      "data_loop": loop,
      "settings": {
          "win_rate": "gold reward model against greedy DPO on the same prompt, random "
                      "position swap; ties count half",
          "win_rate_interval": {"confidence": 0.95, "method": "percentile bootstrap over "
                                "prompts", "resamples": args.bootstrap_resamples},
          "rouge_l": "mean ROUGE-L F1 x 100 against the reference summaries",
          "timing": "wall seconds per output over the whole test pass after one untimed "
                    f"compiling call, calls of {rows} rows (best-of-N: "
                    "prompts_per_call x N); best-of-N includes drawing candidates with both "
                    "models (Realigner.best_of_n) and scoring; relative to greedy DPO in "
                    "the same run",
          "rows_per_call": rows,
      },
      "trained_runs": int(sum(bool(t) for t in trained)),
      "wall_seconds": timer.seconds,
  }
  json_path = os.path.join(workdir, "decoding_compare.json")
  png_path = os.path.join(workdir, "decoding_compare.png")
  common.write_json(json_path, result)
  figure(result, png_path)
  report(result)
  common.log(f"figure: {png_path}\nnumbers: {json_path}")
  return result


def make_loop_pairs(pairs_dir: str, splits: dict, chosen_fn: Callable, rejected_fn: Callable
                    ) -> dict:
  """Writes `pairs_dir`/{train,validation}.jsonl and labels.json (LOOP_RULE) unless they
  exist; returns each split's counts. Identical pairs are dropped from train only (no
  gradient; the validation split keeps every prompt)."""
  paths = {split: os.path.join(pairs_dir, f"{split}.jsonl") for split in splits}
  labels_path = os.path.join(pairs_dir, stages.LABELS_FILE)
  if all(os.path.isfile(p) for p in [labels_path, *paths.values()]):
    with open(labels_path) as f:
      stats = json.load(f)
    if stats.get("rule") == LOOP_RULE:
      return {**stats, "reused": True}
  stats, written = {"rule": LOOP_RULE}, {}
  for split, data in splits.items():
    prompts = data.features["prompts"]
    common.log(f"   AAD and greedy DPO outputs on {len(prompts)} {split} prompts")
    written[split], same = loop_pairs(stages.documents(data), prompts, chosen_fn(prompts),
                                      rejected_fn(prompts), drop_identical=split == "train")
    stats[split] = {"prompts": int(len(prompts)), "pairs": len(written[split]), "identical": same}
  for split, pairs in written.items():
    preferences.write_pairs(paths[split], pairs)
  common.write_json(labels_path, stats)  # last: pairs without it are written again
  return stats


# ----------------------------------------------------------------------------- outputs


def figure(result: dict, path: str) -> None:
  """(a) gold-judge win rate against greedy DPO per arm, 95% intervals; (b) mean gold
  reward against decode time relative to greedy DPO."""
  plt = plots._pyplot()  # pylint: disable=protected-access
  arms = list(result["arms"])
  loop = result["data_loop"].get("greedy_vs_first_dpo")
  if loop:
    arms.append({**loop, "name": "DPO round 2 (AAD pairs), greedy"})
  fig, axes = plt.subplots(1, 2, figsize=(15, 0.35 * len(arms) + 2.5))
  ax = axes[0]
  y = np.arange(len(arms))[::-1]
  rates = np.array([a["gold"]["rate"] for a in arms])
  err = [rates - [a["gold"]["low"] for a in arms], [a["gold"]["high"] for a in arms] - rates]
  ax.errorbar(rates, y, xerr=err, fmt="o", capsize=3, color="C0")
  ax.axvline(0.5, color="red", linewidth=1)
  ax.set_yticks(y, [a["name"] for a in arms], fontsize=8)
  ax.set_xlim(0, 1)
  ax.set_xlabel("gold-judge win rate against greedy DPO (95% CI)")
  ax.set_title("(a) win rate against greedy DPO", fontsize=10)
  ax = axes[1]
  families = ("greedy", "dera", "aad", "best_of", "DPO round 2")
  for a in arms:
    family = next((k for k, f in enumerate(families) if a["name"].startswith(f)),
                  len(families))
    ax.plot(a["relative_time"], a["mean_gold_reward"], "o", color=f"C{family}")
    ax.annotate(a["name"], (a["relative_time"], a["mean_gold_reward"]), fontsize=7,
                xytext=(4, 2), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("decode time per output relative to greedy DPO (after compiling)")
  ax.set_ylabel("mean gold reward")
  ax.set_title("(b) gold reward against decode time", fontsize=10)
  fig.suptitle(f"Decoding-time methods, Figure 7 setting, β = {result['beta']:g} "
               f"({result['preset']} preset, {result['num_prompts']} test prompts)")
  fig.tight_layout()
  common.save_figure(fig, path)
  plt.close(fig)


def report(result: dict) -> None:
  """A markdown table of every arm, then the data loop's line."""
  common.log("\n| arm | win rate vs greedy DPO (gold) | mean gold reward | ROUGE-L | "
             "mean length | time vs greedy DPO |\n|---|---|---|---|---|---|")

  def row(name, a):
    w = a["gold"]
    common.log(f"| {name} | {w['rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}] | "
               f"{a['mean_gold_reward']:.3f} | {a['rouge_l']:.1f} | {a['mean_length']:.1f} | "
               f"{a['relative_time']:.2f}x |")

  for a in result["arms"]:
    row(a["name"], a)
  loop = result["data_loop"]
  if loop.get("greedy_vs_first_dpo"):
    row("DPO round 2 on AAD pairs, greedy", loop["greedy_vs_first_dpo"])
  else:
    common.log(f"| DPO round 2 on AAD pairs | skipped: {loop.get('skipped')} | | | | |")
  common.log("| EFT | not applicable (below) | | | | |")
  common.log(f"\nEFT: {result['eft']['reason']}")
  val = result["validation"]
  common.log(f"DeRa's λ = {val['lam_picked']:g} ({val['picked_by']} on {val['num_prompts']} "
             f"validation prompts); AAD alpha 1 = greedy DPO on "
             f"{result['checks']['aad_alpha1_matches_greedy_dpo']:.0%} of prompts; "
             f"trained {result['trained_runs']} runs; "
             f"wall {sum(result['wall_seconds'].values()):.0f} s")


if __name__ == "__main__":
  main()
