r"""Figure 2: DeRa at λ against models retrained at β/λ, on the length reward (eq. 10).

    python experiments/fig2_length_reward.py --preset tiny --workdir /tmp/deranj/fig2 \
        [--seeds 0,1,2]

The trainer is the preset's FIG2_TRAINER (or --trainer): 'ppo' (the paper's,
`configs/runs/ppo_length.gin`), 'pg' (leave-one-out policy gradient,
`configs/runs/pg_length.gin`) or 'rwl' (reward-weighted maximum likelihood on the SFT
model's samples, `configs/runs/rwl_length.gin`: the runs share one pool of them,
`<workdir>/rwl_pool.npz`); β is FIG2_BETA (or --beta).

Stages (each training run through gin, skipped when already finished):
  1. SFT from the preset's INIT_CHECKPOINT (the shipped tiny T5 for smoke/tiny);
  2. the trainer at β from the SFT model: the aligned model;
  3. the trainer at β/λ for every λ ≠ 1 of the grid: the retrained models;
  4. one DeRa sweep over the whole grid from (SFT, aligned), a single compiled sampler;
  5. samples of every retrained model, and importance-resampled DeRa (the exact mixture);
  6. the optimum π*(β/λ) under the length reward, from FIG2_OPTIMUM_SAMPLES SFT samples
     per prompt (self-normalised importance sampling, deranj.evaluation.optimum);
  7. length reward and length distributions of each, and each run's convergence
     record (its evaluations, final reward / KL / KL to the optimum, gap to the optimum's
     reward, plateau test; a warning line per run not at a plateau), written to fig2.json
     and fig2.png (panel a: reward against λ, 95% intervals clustered by prompt, the
     optimum in black; b: DeRa's lengths; c: the retrained models' lengths; the rewarded
     range [L_MIN, L_MAX] shaded, the optimum's mean length in black).

The λ grid, prompts, samples, SIR candidates and the optimum's SFT samples are the
preset's FIG2_* macros.

Seeds: `--seed s` (default 0) is the sampling key, the runs keeping the run file's SEED.
`--seeds 0,1,2` trains stages 2 and 3 once per seed s (SEED = s, in scripts/sweep.py's
directories: `<kind>_beta<β>` for seed 0, `<kind>_beta<β>_seed<s>` otherwise, so runs a
sweep trained are reused) from the one SFT model, and repeats stages 4, 5 and 7 per seed
with that seed's aligned and retrained models and the key `--seed s` would give. fig2.json
keeps the single-seed keys for the first seed and adds `seeds`, `per_seed` (each seed's
rewards per λ, run records and agreement) and `across_seeds` (per λ each method's mean,
sample standard deviation and range over seeds; Spearman ρ and mean |Δ| per seed and their
mean); panel (a) shades the range over seeds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top

common.setup_path()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deranj import rewards  # noqa: E402
from deranj.data import pipeline  # noqa: E402
from deranj.evaluation import win_rates  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import stages  # noqa: E402

# --trainer -> (run file, run kind: experiments.stages's name for its runs).
TRAINERS = {"ppo": ("configs/runs/ppo_length.gin", "ppo"),
            "pg": ("configs/runs/pg_length.gin", "pg_length"),
            "rwl": ("configs/runs/rwl_length.gin", "rwl_length")}


def length_stats(tokens: np.ndarray, num_prompts: int, l_min: int, l_max: int,
                 bins: np.ndarray) -> dict:
  """Length reward (mean and its standard error clustered by prompt) and lengths of
  [P * samples, T] prompt-major samples."""
  lengths = np.asarray(rewards.response_lengths(tokens))
  reward = np.asarray(rewards.length_reward(lengths, l_min, l_max))
  mean, se = win_rates.clustered_mean_se(reward, num_prompts)
  counts, _ = np.histogram(lengths, bins=bins)
  return {"length_reward": mean, "length_reward_se": se, "mean_length": float(lengths.mean()),
          "in_range": float((reward == 0).mean()), "lengths": lengths.tolist(),
          "histogram": counts.tolist()}


def optimum_curve(sft_tokens: np.ndarray, num_prompts: int, betas, l_min: int,
                  l_max: int) -> dict:
  """The optimum π*(b) under the length reward at each b of `betas`, from [P * M] SFT
  samples: its length reward, mean length and share in range, with the weights' ESS."""
  lengths = np.asarray(rewards.response_lengths(sft_tokens), np.float64)
  reward = np.asarray(rewards.length_reward(lengths, l_min, l_max), np.float64)
  per_prompt = len(lengths) // num_prompts
  values = {"length_reward": reward, "mean_length": lengths,
            "in_range": (reward == 0).astype(np.float64)}
  hits = (reward == 0).reshape(num_prompts, per_prompt).any(axis=1)
  return {
      **stages.optimum_method(per_prompt, num_prompts, "length reward (eq. 10)"),
      "sft": {"length_reward": float(reward.mean()), "mean_length": float(lengths.mean())},
      # Where no SFT sample is in range, the optimum's mass there is invisible to SNIS.
      "prompts_without_an_in_range_sample": int((~hits).sum()),
      "points": stages.optimum_points(reward, values, betas, per_prompt)}


def seed_results(seed: int, sampled: stages.Samples, run_dirs: list[str], lams: list[float],
                 beta: float, kind: str, points: list[dict], num_prompts: int,
                 length_range: tuple[int, int], bins: np.ndarray, candidates: int) -> dict:
  """One seed's numbers: per λ each method's length statistics (the optimum's `points`
  beside them), each run's convergence record, and DeRa's agreement with the retrained
  models across λ."""
  per_lam, records = [], []
  for i, lam in enumerate(lams):
    stats = {m: length_stats(sampled.tokens[m][i], num_prompts, *length_range, bins)
             for m in stages.METHODS}
    stats["dera_resampled"].update(mean_ess=float(sampled.ess[i].mean()),
                                   num_candidates=candidates)
    record = stages.run_record(run_dirs[i], kind, beta / lam, "length reward",
                               points[i]["length_reward"], stats["retrained"]["length_reward"])
    records.append(record)
    stats["retrained"]["run"] = record["run"]
    stats["retrained"]["plateau"] = record["plateau"]["passed"]
    per_lam.append({"lam": lam, "beta_over_lam": beta / lam, **stats, "optimum": points[i]})
  reward = lambda key: [r[key]["length_reward"] for r in per_lam]  # noqa: E731
  return {
      "seed": seed, "per_lam": per_lam, "runs": records,
      "all_runs_at_plateau": all(r["plateau"]["passed"] for r in records),
      "agreement": {
          "length_reward": common.agreement(lams, reward("dera"), reward("retrained")),
          "dera_vs_resampled_mean_abs_difference": float(np.mean(np.abs(
              np.subtract(reward("dera"), reward("dera_resampled"))))),
      },
      "dera_sweep_compiles": sampled.compiles,
  }


# Per-sample lists, kept for the first seed only (its per_lam): per_seed stays small.
PER_SEED_LEFT_OUT = ("lengths", "histogram")


def per_seed_entry(results: dict) -> dict:
  """`seed_results` without the per-sample lists and the optimum (the same for every seed)."""
  rows = [{k: ({n: x for n, x in v.items() if n not in PER_SEED_LEFT_OUT}
               if k in stages.METHODS else v) for k, v in row.items() if k != "optimum"}
          for row in results["per_lam"]]
  return {**results, "per_lam": rows}


def across_seeds(per_seed: list[dict]) -> dict:
  """The spread over seeds of the length reward (stages.across_seeds)."""
  return stages.across_seeds(per_seed, lambda m: m["length_reward"], "length_reward")


def report(result: dict) -> None:
  if "per_seed" in result:
    common.log(f"\nseed {result['seed']} (the first of seeds "
               f"{','.join(map(str, result['seeds']))}):")
  common.log("\n| λ | β/λ | DeRa reward | retrained reward | DeRa+SIR reward | optimum reward "
             "(ESS min) | DeRa length | retrained length | optimum length | retrained at "
             "plateau |\n|---|---|---|---|---|---|---|---|---|---|")
  for r in result["per_lam"]:
    reward = lambda m: f"{r[m]['length_reward']:.3f} ± {r[m]['length_reward_se']:.3f}"  # noqa: E731
    opt = r["optimum"]
    opt_reward = "left out" if opt["left_out"] else f"{opt['length_reward']:.3f}"
    opt_length = "left out" if opt["left_out"] else f"{opt['mean_length']:.1f}"
    common.log(f"| {r['lam']:g} | {r['beta_over_lam']:.4g} | {reward('dera')} | "
               f"{reward('retrained')} | {reward('dera_resampled')} | {opt_reward} "
               f"({opt['ess_min']:.1f}) | {r['dera']['mean_length']:.1f} | "
               f"{r['retrained']['mean_length']:.1f} | {opt_length} | "
               f"{'yes' if r['retrained']['plateau'] else 'no'} |")
  agree = result["agreement"]["length_reward"]
  common.log(f"\nreward ± its standard error over prompts; Spearman ρ(DeRa, retrained) = "
             f"{common.spearman_text(agree)}; mean |Δ| = {agree['mean_abs_difference']:.3f}; "
             f"wall {sum(result['wall_seconds'].values()):.0f} s")
  if "per_seed" in result:
    stages.report_across_seeds(result["across_seeds"], "mean length reward")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(common.PRESET_FILES), default="tiny")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--beta", type=float, default=None,
                      help="the aligned model's KL strength; default: the preset's FIG2_BETA")
  parser.add_argument("--trainer", choices=sorted(TRAINERS), default=None,
                      help="default: the preset's FIG2_TRAINER")
  parser.add_argument("--lams", default=None,
                      help="comma-separated λ grid (1 is added); default: the preset's FIG2_LAMS")
  common.add_seed_flags(parser, "the sampling key")
  args = parser.parse_args(argv)
  seeds = common.seed_list(args)
  several = args.seeds is not None
  grid = stages.read_grid(args.preset, "FIG2", args.lams)
  lams = grid.lams
  workdir = os.path.abspath(args.workdir)
  macros = common.preset_macros(args.preset, ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH",
                                              "L_MIN", "L_MAX", "FIG2_BETA", "FIG2_TRAINER"])
  if args.beta is None:
    args.beta = float(macros["FIG2_BETA"])
  if args.trainer is None:
    args.trainer = macros["FIG2_TRAINER"]
    if args.trainer not in TRAINERS:
      raise SystemExit(f"error: {common.PRESET_FILES[args.preset]}: FIG2_TRAINER = "
                       f"{args.trainer!r}: expected one of {sorted(TRAINERS)}.")
  if not args.beta > 0:
    raise SystemExit(f"error: --beta={args.beta}: the KL strength must be > 0.")
  os.makedirs(workdir, exist_ok=True)
  run_gin, kind = TRAINERS[args.trainer]
  timer = common.Timer()
  runs = stages.Runs(1 + len(seeds) * len(lams))  # SFT, then per seed one run per λ

  sft_dir = common.run_dir(workdir, "sft")
  with timer("sft"):
    runs.train(stages.SFT_RUN, args.preset, sft_dir)

  def run_dir(lam, seed):  # one --seed: the run file's SEED, seed 0's directory
    return common.run_dir(workdir, kind, args.beta / lam, seed if several else 0)

  def align(lam, seed):
    # The bindings of `scripts/sweep.py --seeds`, so that either reuses the other's runs.
    return runs.train(run_gin, args.preset, run_dir(lam, seed),
                      [f"INIT_CHECKPOINT = '{sft_dir}'", f"BETA = {args.beta / lam}",
                       *([f"SEED = {seed}"] if several else []),
                       *stages.eval_bindings(args.preset, kind),
                       *stages.pool_bindings(workdir, kind)])

  for seed in seeds:
    with timer("aligned"):
      align(1.0, seed)
    with timer("retrained"):
      for lam in lams:
        if lam != 1:
          align(lam, seed)

  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": macros["TARGETS_LENGTH"]}
  val = pipeline.load(macros["TASK"], "validation", lengths, max_examples=grid.prompts)
  prompts = val.features["prompts"]
  num_prompts = len(prompts)
  max_len = macros["TARGETS_LENGTH"]
  bins = np.arange(0, max_len + 2)
  l_min, l_max = macros["L_MIN"], macros["L_MAX"]
  ref, ref_params = common.load_policy(sft_dir)
  with timer("optimum"):  # the SFT model's: one for every seed, from the first seed's key
    sft_tokens = stages.sample_sft(ref, ref_params, prompts, grid, max_len,
                                   jax.random.PRNGKey(seeds[0]))
    optimum = optimum_curve(sft_tokens, num_prompts, [args.beta / lam for lam in lams],
                            l_min, l_max)
  realigner, results = None, []
  for seed in seeds:
    run_dirs = [run_dir(lam, seed) for lam in lams]
    realigner, retrained_params = stages.seed_models(realigner, ref, ref_params, run_dirs,
                                                     lams, max_len)
    if several:
      common.log(f"-- seed {seed}")
    # A seed samples with the key `--seed` gives it alone.
    sampled = stages.sample_methods(timer, realigner, ref, list(zip(run_dirs, retrained_params)),
                                    prompts, grid, max_len, jax.random.PRNGKey(seed))
    results.append(seed_results(seed, sampled, run_dirs, lams, args.beta, kind,
                                optimum["points"], num_prompts, (l_min, l_max), bins,
                                grid.candidates))
  first = results[0]
  result = {
      "figure": "2", "preset": args.preset, "trainer": args.trainer, "run_gin": run_gin,
      "beta": args.beta, "lams": lams,
      "seed": seeds[0], "length_range": [l_min, l_max], "num_prompts": int(num_prompts),
      "samples_per_prompt": grid.samples, "histogram_bins": bins.tolist(),
      "optimum": {k: v for k, v in optimum.items() if k != "points"},
      **stages.seed_fields(first),
      "wall_seconds": timer.seconds,
  }
  if several:
    per_seed = [per_seed_entry(r) for r in results]
    result.update(stages.seeds_fields(
        seeds, per_seed, across_seeds(per_seed), "without per-sample lengths",
        "the optimum (of the SFT model) is shared"))
  stages.write_figure(workdir, "fig2", result, plots.figure2, report,
                      [record for r in results for record in r["runs"]])
  return result


if __name__ == "__main__":
  main()
