r"""What Figures 3 and 7 share: DeRa against retrained models on summarization (paper
Sec. 5.4, App. D.3), with an offline stand-in for the human preference labels.

The stages live in stages.py (training, sampling, pairs), judging.py (judges, eq. 14)
and plots.py; this module runs them in order (each training run through gin, skipped
when already finished; see common.py):
  1. `sft`: SFT (configs/runs/sft.gin), the same run directory as Figure 2's;
  2. `gold_rm`: the gold reward model, configs/runs/reward_model.gin on
     GOLD_PREFERENCE_TASK for GOLD_RM_STEPS (more pairs and steps than the proxy's).
     It stands in for the human labellers and for PaLM 2 (Gao et al. 2023's synthetic
     setting): it labels the training pairs and judges the samples;
  3. `pairs/{train,validation}.jsonl`: two SFT samples per prompt of the TASK's train
     (validation) split, labelled by Bradley-Terry on the gold reward (the first chosen
     with probability sigmoid(r_a - r_b), seeded per pair; `stages.LABEL_RULE`, also in
     `pairs/labels.json` and figN.json's "pairs"), as human labels are noisy;
     PreferencePair JSONL with the sampled token ids, read back as the
     `preference_pairs` task (`preference_pairs_dir.path = DIR/pairs`), so the reward
     model and DPO train on exactly those ids. The validation pairs are held out;
  4. the figure's aligned model at β and models retrained at β/λ (the driver's
     `train_aligned`), from the SFT model on those pairs;
  5. one DeRa sweep over the λ grid from (SFT, aligned) on held-out (test) prompts, one
     compiled sampler; samples of SFT and of every retrained model; importance-resampled
     DeRa (the exact sequence-level mixture);
  6. judges: the gold reward model (with the random position swap of App. D.3) and
     ROUGE-L against the references. Win rates with 95% intervals from a bootstrap
     over prompts (--bootstrap_resamples; a prompt's samples move together) (a) against SFT,
     (b) against the β model, (c) DeRa against the model retrained at the same λ; eq. 14
     pairwise accuracy of every DeRa and retrained model on the held-out pairs;
  7. the optimum π*(β/λ) of the reward the figure's aligner optimises (the driver's
     `optimum_reward`), from SUMMARIZATION_OPTIMUM_SAMPLES SFT samples per test prompt
     (self-normalised importance sampling, deranj.evaluation.optimum): its gold win rate
     against SFT and its mean gold reward; each aligned run's convergence record (its
     evaluations, gap to the optimum, plateau test; a warning line per run not at a
     plateau);
  8. `figN.json` and `figN.png`.

`--seeds 0,1,2` runs stage 4 once per seed (SEED = s, scripts/sweep.py's directories:
`<kind>_beta<β>` for seed 0, `<kind>_beta<β>_seed<s>` otherwise) and stages 5-7 per seed
with that seed's models and key; stages 1-3, the SFT samples and the optimum curve are the
first seed's, shared. figN.json keeps the single-seed keys for the first seed and adds
`per_seed` (each seed's gold win rates against SFT, gold rewards, accuracies, runs and
agreement) and `across_seeds` (their spread); panel (a) shades the range over seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Optional, Sequence

from experiments import common

common.setup_path()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deranj.data import pipeline  # noqa: E402
from deranj.data import tasks  # noqa: E402
from deranj.evaluation import judges  # noqa: E402
from deranj.evaluation import optimum as optimum_lib  # noqa: E402
from deranj.evaluation import win_rates  # noqa: E402
from experiments import judging  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import stages  # noqa: E402
from experiments.judging import JUDGES  # noqa: E402
from experiments.stages import METHODS  # noqa: E402


def parse_args(argv: Optional[Sequence[str]], description: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--preset", choices=sorted(common.PRESET_FILES), default="tiny")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lams", default=None,
                      help="comma-separated λ grid (1 is added); default: the preset's "
                      "SUMMARIZATION_LAMS")
  common.add_seed_flags(parser, "the sampling, pair-labelling and judging key")
  parser.add_argument("--model_gin", default=None,
                      help="a model file read after the preset in every run, e.g. "
                      "configs/models/llama_tiny.gin (a decoder-only model)")
  parser.add_argument("--bootstrap_resamples", type=int, default=win_rates.DEFAULT_RESAMPLES,
                      help="resamples of the prompts for the win rates' 95%% intervals "
                      "(samples of one prompt are resampled together)")
  args = parser.parse_args(argv)
  if args.bootstrap_resamples < 100:
    parser.error(f"--bootstrap_resamples={args.bootstrap_resamples}: at least 100.")
  args.seed_list = common.seed_list(args)
  args.seed = args.seed_list[0]
  return args


def base_stages(ctx: stages.Context, macros: dict, grid: stages.Grid, timer: common.Timer,
                rng: jax.Array, seed: int, trained: list) -> tuple:
  """Stages 1-3: `sft`, `gold_rm` and the labelled `pairs/`, each skipped when done.

  Appends whether each run trained to `trained`; returns (the gold judge, (model, SFT
  params), the pairs' labelling statistics).
  """
  with timer("sft"):
    trained.append(ctx.train(stages.SFT_RUN, ctx.sft_dir))
  with timer("gold_rm"):
    trained.append(ctx.train(stages.RM_RUN, ctx.gold_dir, [
        f"INIT_CHECKPOINT = '{ctx.sft_dir}'", "PREFERENCE_TASK = %GOLD_PREFERENCE_TASK",
        "RM_STEPS = %GOLD_RM_STEPS"]))
  from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
  gold = judges.RewardModelJudge(*reward_model.load_reward_model(ctx.gold_dir),
                                 batch_size=grid.chunk)
  sft = common.load_policy(ctx.sft_dir)
  with timer("pairs"):
    pair_stats = stages.make_pairs(ctx, macros, grid, sft, gold,
                                   jax.random.fold_in(rng, stages.PAIR_SAMPLES), seed)
  return gold, sft, pair_stats


GOLD_OPTIMUM = "gold reward model (gold_rm)"
# What the optimum's numbers are comparable with, written to figN.json.
OPTIMUM_METRIC = (
    "optimum.gold_vs_sft: E_{y ~ pi*}[share of the prompt's other SFT samples y' with "
    "r_gold(y) > r_gold(y'), ties 1/2] = pi*'s gold win rate against SFT; comparable with "
    "per_lam[*][method].gold.vs_sft.rate (the same judge: a reward model's outcome does not "
    "depend on the position swap; the same test prompts), whose 95% intervals it may fall "
    "in or out of. optimum.mean_gold_reward: comparable with per_lam[*][method]"
    ".mean_gold_reward. optimum.mean_trained_reward: the reward defining the optimum, "
    "comparable with runs[*].gap_to_optimum.run. No ROUGE-L, vs-β or eq. 14 counterpart.")


def run(figure: str, aligner: str, kind: str, argv: Optional[Sequence[str]], description: str,
        train_aligned: Callable[[stages.Context, float], bool],
        prepare: Optional[tuple[str, Callable[[stages.Context], bool]]] = None,
        optimum_reward: Optional[Callable[..., tuple[str, object]]] = None,
        ) -> dict:
  """Runs a figure end to end and returns what it writes to figN.json.

  Args:
    figure, aligner: "3", "policy gradient": names in the outputs.
    kind: the aligned runs' directory prefix (`common.run_dir(workdir, kind, beta)`).
    argv: command-line arguments (None: sys.argv).
    description: --help's.
    train_aligned: `train_aligned(ctx, beta, seed)` trains the aligned model at `beta`
      from the SFT model through `ctx.train` in `ctx.run_dir(kind, beta, seed)` (seed
      None: the run file's SEED; else SEED = seed, as scripts/sweep.py --seeds), or skips
      it when finished (returns its bool).
    prepare: (stage name, fn(ctx) -> bool): a training run after the pairs and before
      the aligned models (Figure 3's proxy reward model).
    optimum_reward: fn(ctx, gold judge, batch_size) -> (its name, a RewardModelJudge):
      the reward whose optimum pi*(β/λ) the figure draws; None: the gold reward model.
  """
  args = parse_args(argv, description)
  with common.model_gin(args.model_gin):
    return _run(figure, aligner, kind, args, train_aligned, prepare, optimum_reward)


def _run(figure, aligner, kind, args, train_aligned, prepare, optimum_reward) -> dict:
  """`run` after its arguments are parsed, with the model's gin file in force."""
  grid = stages.read_grid(args.preset, "SUMMARIZATION", args.lams)
  lams = grid.lams
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  # sft, gold_rm, [prepare], then per seed the aligned model and one per other λ.
  ctx = stages.Context(args.preset, workdir, stages.Runs(
      2 + bool(prepare) + len(args.seed_list) * len(lams)))
  macros = common.preset_macros(args.preset, ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH"])
  max_len = macros["TARGETS_LENGTH"]
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": max_len}
  timer = common.Timer()
  rng = jax.random.PRNGKey(args.seed)
  trained = []

  gold, (ref, sft_params), pair_stats = base_stages(ctx, macros, grid, timer, rng, args.seed,
                                                   trained)
  if prepare:
    with timer(prepare[0]):
      trained.append(prepare[1](ctx))
  several = args.seeds is not None
  seeds = args.seed_list
  for seed in seeds:
    run_seed = seed if several else None
    with timer("aligned"):
      trained.append(train_aligned(ctx, args.beta, run_seed))
    with timer("retrained"):
      trained += [train_aligned(ctx, args.beta / lam, run_seed) for lam in lams if lam != 1]

  test = pipeline.load(macros["TASK"], "test", lengths, max_examples=grid.prompts)
  prompts = test.features["prompts"]
  samples = grid.samples
  with timer("sft_sampling"):  # the SFT model's: one for every seed, the first seed's key
    sft_many = stages.sample_sft(ref, sft_params, prompts, grid, max_len, rng)
    sft_tokens = stages.first_samples(sft_many, len(prompts), samples)
  with timer("pairwise_accuracy"):
    pairs_task = f"fig{figure}_pairs"
    tasks.register_preference_pairs(pairs_task, ctx.pairs_dir)
    held_out = pipeline.load(pairs_task, "validation", lengths).features
    pair_batch = min(grid.chunk, len(held_out["prompts"]))
    sft_acc = judging.model_pairwise_accuracy(ref, sft_params, held_out, pair_batch)
  with timer("optimum"):
    reward_name, reward_judge = (optimum_reward(ctx, gold, grid.chunk) if optimum_reward
                                 else (GOLD_OPTIMUM, gold))
    opt = optimum_curve(gold, reward_name, reward_judge, prompts, sft_many,
                        [args.beta / lam for lam in lams])
  points = opt.pop("points")
  references = np.repeat(np.asarray(test.texts["targets"], object), samples).tolist()

  shared = SeedShared(timer=timer, ref=ref, prompts=prompts, grid=grid, max_len=max_len,
                      sft_tokens=sft_tokens, held_out=held_out, pair_batch=pair_batch,
                      points=points, reward_name=reward_name, reward_judge=reward_judge,
                      kind=kind, beta=args.beta, lams=lams)
  realigner, results = None, []
  for seed in seeds:
    run_dirs = [common.run_dir(workdir, kind, args.beta / lam, seed if several else 0)
                for lam in lams]
    realigner, retrained_params = stages.seed_models(realigner, ref, sft_params, run_dirs,
                                                     lams, max_len)
    if several:
      common.log(f"-- seed {seed}")
    judge = judging.Judging(gold, np.repeat(prompts, samples, axis=0), references, seed,
                            samples, args.bootstrap_resamples)
    results.append(seed_results(shared, seed, realigner, run_dirs, retrained_params, judge))
  first = results[0]
  result = {
      "figure": figure, "aligner": aligner, "preset": args.preset, "beta": args.beta,
      "lams": lams, "seed": seeds[0], "num_prompts": int(len(prompts)),
      "samples_per_prompt": samples, "pairs": pair_stats,
      "win_rate_interval": {"confidence": 0.95, "method": "percentile bootstrap over "
                            "prompts (a prompt's samples resampled together)",
                            "resamples": args.bootstrap_resamples},
      "held_out_pairs": int(len(held_out["prompts"])),
      "sft": {**judge.describe(sft_tokens), "pairwise_accuracy": sft_acc},
      "optimum": {**opt, "metric": OPTIMUM_METRIC},
      **stages.seed_fields(first),
      "trained_runs": int(sum(bool(t) for t in trained)),
      "wall_seconds": timer.seconds,
  }
  if several:
    per_seed = [per_seed_entry(r) for r in results]
    result.update(stages.seeds_fields(
        seeds, per_seed, across_seeds(per_seed),
        "gold win rates against SFT, gold rewards, accuracies", "SFT samples, pairs and the "
        "optimum are shared (the first seed's key)"))
  stages.write_figure(workdir, f"fig{figure}", result, plots.summarization_figure, report,
                      [record for r in results for record in r["runs"]])
  return result


@dataclasses.dataclass(frozen=True)
class SeedShared:
  """What every seed's `seed_results` reads and no seed changes: the reference model, the
  test prompts and their SFT samples, the held-out pairs, the optimum's points per λ and
  the reward they are of (`reward_name`, `reward_judge`), the aligned runs' kind, β, λs."""
  timer: common.Timer
  ref: object
  prompts: np.ndarray
  grid: stages.Grid
  max_len: int
  sft_tokens: np.ndarray
  held_out: dict
  pair_batch: int
  points: list
  reward_name: str
  reward_judge: object
  kind: str
  beta: float
  lams: list


def seed_results(shared: SeedShared, seed: int, realigner, run_dirs: list[str],
                 retrained_params: list, judge: judging.Judging) -> dict:
  """One seed's numbers, sampled with the key `--seed seed` gives: samples of DeRa (the
  realigner holds this seed's aligned model), SIR and each retrained model (in
  `run_dirs`, one per λ); both judges' win rates, eq. 14 accuracies, each run's
  convergence record against the optimum's points, and DeRa's agreement with the
  retrained models across λ."""
  s = shared
  lams = s.lams
  sampled = stages.sample_methods(s.timer, realigner, s.ref,
                                  list(zip(run_dirs, retrained_params)), s.prompts, s.grid,
                                  s.max_len, jax.random.PRNGKey(seed))
  tokens = sampled.tokens
  with s.timer("pairwise_accuracy"):
    dera_acc = win_rates.realigned_pairwise_accuracy(
        realigner, s.held_out["prompts"], s.held_out["chosen_responses"],
        s.held_out["rejected_responses"], lams, s.pair_batch)
    retrained_acc = [judging.model_pairwise_accuracy(s.ref, p, s.held_out, s.pair_batch)
                     for p in retrained_params]
  with s.timer("judging"):
    beta_tokens = tokens["retrained"][lams.index(1.0)]
    per_lam = []
    for i, lam in enumerate(lams):
      row = {"lam": lam, "beta_over_lam": s.beta / lam}
      for method in METHODS:
        m = tokens[method][i]
        vs_sft, vs_beta = judge.compare(m, s.sft_tokens), judge.compare(m, beta_tokens)
        vs_ret = (judge.compare(m, tokens["retrained"][i]) if method != "retrained" else None)
        row[method] = {
            j: {"vs_sft": vs_sft[j], "vs_beta": vs_beta[j],
                **({"vs_retrained": vs_ret[j]} if vs_ret else {})}
            for j in JUDGES}
        row[method].update(judge.describe(m))
      row["dera"]["pairwise_accuracy"] = dera_acc[float(lam)]
      row["retrained"]["pairwise_accuracy"] = retrained_acc[i]
      # eq. 14 needs normalised log-probabilities; the exact mixture's normaliser is
      # unknown, so resampled DeRa has no pairwise accuracy.
      row["dera_resampled"]["pairwise_accuracy"] = None
      row["dera_resampled"]["mean_ess"] = float(sampled.ess[i].mean())
      row["dera_resampled"]["num_candidates"] = s.grid.candidates
      per_lam.append(row)
  with s.timer("optimum"):
    records = []
    for i, (row, point) in enumerate(zip(per_lam, s.points)):
      row["optimum"] = point
      run_reward = float(s.reward_judge.rewards(judge.prompts, tokens["retrained"][i]).mean())
      record = stages.run_record(run_dirs[i], s.kind, row["beta_over_lam"], s.reward_name,
                                 point["mean_trained_reward"], run_reward)
      records.append(record)
      row["retrained"]["run"] = record["run"]
      row["retrained"]["plateau"] = record["plateau"]["passed"]

  def rates(method, j, key):
    return [r[method][j][key]["rate"] for r in per_lam]

  agreement = {}
  for j in JUDGES:
    for key in ("vs_sft", "vs_beta"):
      agreement[f"{j}/{key}"] = common.agreement(
          lams, rates("dera", j, key), rates("retrained", j, key))
      agreement[f"{j}/{key}/resampled"] = common.agreement(
          lams, rates("dera_resampled", j, key), rates("retrained", j, key))
  agreement["pairwise_accuracy"] = common.agreement(
      lams, [dera_acc[float(x)] for x in lams], retrained_acc)
  picked = {m: float(lams[int(np.argmax(rates(m, "gold", "vs_sft")))]) for m in METHODS}
  return {"seed": seed, "per_lam": per_lam, "runs": records,
          "all_runs_at_plateau": all(r["plateau"]["passed"] for r in records),
          "agreement": agreement,
          "lam_picked": {"by": "gold judge, win rate against SFT", **picked},
          "dera_sweep_compiles": sampled.compiles}


def per_seed_entry(results: dict) -> dict:
  """A seed's results with, per λ and method, only the gold judge's win rate against
  SFT, the mean gold reward and eq. 14's accuracy (per_seed stays small)."""
  rows = [{"lam": row["lam"], "beta_over_lam": row["beta_over_lam"],
           **{m: {"gold_vs_sft": row[m]["gold"]["vs_sft"],
                  "mean_gold_reward": row[m]["mean_gold_reward"],
                  "pairwise_accuracy": row[m]["pairwise_accuracy"]} for m in METHODS}}
          for row in results["per_lam"]]
  return {**results, "per_lam": rows}


def across_seeds(per_seed: list[dict]) -> dict:
  """The spread over seeds of the gold judge's win rate against SFT (stages.across_seeds)."""
  return stages.across_seeds(per_seed, lambda m: m["gold_vs_sft"]["rate"], "gold/vs_sft")


def optimum_curve(gold, trained_name: str, trained, prompts: np.ndarray,
                  sft_tokens: np.ndarray, betas: Sequence[float]) -> dict:
  """The optimum pi*(b) of `trained`'s reward at each b of `betas`, from [P * M] SFT
  samples (prompt-major): its gold win rate against SFT, mean gold reward and mean
  trained reward, with the weights' ESS."""
  per_prompt = len(sft_tokens) // len(prompts)
  rows = np.repeat(prompts, per_prompt, axis=0)
  gold_scores = np.asarray(gold.rewards(rows, sft_tokens), np.float64)
  trained_scores = (gold_scores if trained is gold
                    else np.asarray(trained.rewards(rows, sft_tokens), np.float64))
  values = {"gold_vs_sft": optimum_lib.win_rate_against_samples(gold_scores, per_prompt),
            "mean_gold_reward": gold_scores, "mean_trained_reward": trained_scores}
  return {**stages.optimum_method(per_prompt, len(prompts), trained_name),
          "sft": {"mean_gold_reward": float(gold_scores.mean()),
                  "mean_trained_reward": float(trained_scores.mean())},
          "points": stages.optimum_points(trained_scores, values, betas, per_prompt)}


def report(result: dict) -> None:
  """A markdown table of the gold judge's win rates (95% intervals bootstrapped over
  prompts) and eq. 14 accuracies."""
  common.log("\n| λ | β/λ | DeRa vs SFT | retrained vs SFT | SIR vs SFT | optimum vs SFT "
             "(ESS min) | DeRa vs π(β) | retrained vs π(β) | DeRa vs retrained | acc DeRa | "
             "acc retrained | gold reward DeRa / retrained / optimum | retrained at plateau |"
             "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")

  def g(row, method, key):
    w = row[method]["gold"][key]
    return f"{w['rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}]"

  def opt(row, key):
    o = row["optimum"]
    return "left out" if o["left_out"] else f"{o[key]:.2f}"

  for r in result["per_lam"]:
    common.log(f"| {r['lam']:.4g} | {r['beta_over_lam']:.4g} | {g(r, 'dera', 'vs_sft')} | "
               f"{g(r, 'retrained', 'vs_sft')} | {g(r, 'dera_resampled', 'vs_sft')} | "
               f"{opt(r, 'gold_vs_sft')} ({r['optimum']['ess_min']:.1f}) | "
               f"{g(r, 'dera', 'vs_beta')} | {g(r, 'retrained', 'vs_beta')} | "
               f"{g(r, 'dera', 'vs_retrained')} | {r['dera']['pairwise_accuracy']:.2f} | "
               f"{r['retrained']['pairwise_accuracy']:.2f} | "
               f"{r['dera']['mean_gold_reward']:.2f} / {r['retrained']['mean_gold_reward']:.2f}"
               f" / {opt(r, 'mean_gold_reward')} | "
               f"{'yes' if r['retrained']['plateau'] else 'no'} |")
  agree = result["agreement"]["gold/vs_sft"]
  common.log(f"\ngold judge vs SFT: Spearman ρ(DeRa, retrained) = {common.spearman_text(agree)}, "
             f"mean |Δ| = {agree['mean_abs_difference']:.3f}; λ picked: "
             f"{ {k: v for k, v in result['lam_picked'].items() if k != 'by'} }; "
             f"trained {result['trained_runs']} runs; "
             f"wall {sum(result['wall_seconds'].values()):.0f} s")
  if "per_seed" in result:
    stages.report_across_seeds(result["across_seeds"], "gold win rate against SFT")
