r"""Figure 2: DeRa at λ against models retrained at β/λ, on the length reward (eq. 10).

    python experiments/fig2_length_reward.py --preset tiny --workdir /tmp/deranj/fig2

The trainer is the preset's FIG2_TRAINER (or --trainer): 'ppo' (the paper's,
`configs/runs/ppo_length.gin`) or 'pg' (leave-one-out policy gradient,
`configs/runs/pg_length.gin`); β is FIG2_BETA (or --beta).

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

from deranj import dera  # noqa: E402
from deranj import rewards  # noqa: E402
from deranj.data import pipeline  # noqa: E402
from deranj.evaluation import win_rates  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import stages  # noqa: E402

# --trainer -> (run file, run kind: experiments.stages's name for its runs).
TRAINERS = {"ppo": ("configs/runs/ppo_length.gin", "ppo"),
            "pg": ("configs/runs/pg_length.gin", "pg_length")}


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


def report(result: dict) -> None:
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
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  grid = stages.read_grid(args.preset, "FIG2", args.lams)
  lams = grid.lams
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
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
  run_gin, kind = TRAINERS[args.trainer]
  timer = common.Timer()
  runs = stages.Runs(1 + len(lams))  # SFT, then one alignment run per λ

  sft_dir = common.run_dir(workdir, "sft")
  with timer("sft"):
    runs.train(stages.SFT_RUN, args.preset, sft_dir)
  run_dirs = [common.run_dir(workdir, kind, args.beta / lam) for lam in lams]

  def align(lam):
    return runs.train(run_gin, args.preset, common.run_dir(workdir, kind, args.beta / lam),
                      [f"INIT_CHECKPOINT = '{sft_dir}'", f"BETA = {args.beta / lam}",
                       *stages.eval_bindings(args.preset, kind)])

  with timer("aligned"):
    align(1.0)
  with timer("retrained"):
    for lam in lams:
      if lam != 1:
        align(lam)

  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": macros["TARGETS_LENGTH"]}
  val = pipeline.load(macros["TASK"], "validation", lengths, max_examples=grid.prompts)
  prompts = val.features["encoder_input_tokens"]
  num_prompts = len(prompts)
  max_len = macros["TARGETS_LENGTH"]
  bins = np.arange(0, max_len + 2)
  l_min, l_max = macros["L_MIN"], macros["L_MAX"]
  ref, ref_params = common.load_policy(sft_dir)
  retrained_params = [common.load_policy(d)[1] for d in run_dirs]
  realigner = dera.Realigner(ref, ref_params, ref, retrained_params[lams.index(1.0)],
                             max_decode_len=max_len)
  rng = jax.random.PRNGKey(args.seed)
  sampled = stages.sample_methods(timer, realigner, ref, list(zip(run_dirs, retrained_params)),
                                  prompts, grid, max_len, rng)
  with timer("optimum"):
    sft_tokens = stages.sample_sft(ref, ref_params, prompts, grid, max_len, rng)
    optimum = optimum_curve(sft_tokens, num_prompts, [args.beta / lam for lam in lams],
                            l_min, l_max)

  per_lam, runs_record = [], []
  for i, lam in enumerate(lams):
    stats = {m: length_stats(sampled.tokens[m][i], num_prompts, l_min, l_max, bins)
             for m in stages.METHODS}
    stats["dera_resampled"].update(mean_ess=float(sampled.ess[i].mean()),
                                   num_candidates=grid.candidates)
    point = optimum["points"][i]
    record = stages.run_record(run_dirs[i], kind, args.beta / lam, "length reward",
                               point["length_reward"], stats["retrained"]["length_reward"])
    runs_record.append(record)
    stats["retrained"]["run"] = record["run"]
    stats["retrained"]["plateau"] = record["plateau"]["passed"]
    per_lam.append({"lam": lam, "beta_over_lam": args.beta / lam, **stats, "optimum": point})
  reward = lambda key: [r[key]["length_reward"] for r in per_lam]  # noqa: E731
  result = {
      "figure": "2", "preset": args.preset, "trainer": args.trainer, "run_gin": run_gin,
      "beta": args.beta, "lams": lams,
      "seed": args.seed, "length_range": [l_min, l_max], "num_prompts": int(num_prompts),
      "samples_per_prompt": grid.samples, "histogram_bins": bins.tolist(),
      "optimum": {k: v for k, v in optimum.items() if k != "points"},
      "per_lam": per_lam,
      "runs": runs_record,
      "plateau_rule": stages.PLATEAU_RULE,
      "all_runs_at_plateau": all(r["plateau"]["passed"] for r in runs_record),
      "agreement": {
          "length_reward": common.agreement(lams, reward("dera"), reward("retrained")),
          "dera_vs_resampled_mean_abs_difference": float(np.mean(np.abs(
              np.subtract(reward("dera"), reward("dera_resampled"))))),
      },
      "dera_sweep_compiles": sampled.compiles,
      "wall_seconds": timer.seconds,
  }
  json_path, png_path = (os.path.join(workdir, f"fig2.{x}") for x in ("json", "png"))
  common.write_json(json_path, result)
  plots.figure2(result, png_path)
  report(result)
  stages.warn_unconverged(runs_record)
  common.log(f"figure: {png_path}\nnumbers: {json_path}")
  return result


if __name__ == "__main__":
  main()
