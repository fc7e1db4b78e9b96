r"""Figure 2: DeRa at λ against PPO models retrained at β/λ, on the length reward (eq. 10).

    python experiments/fig2_length_reward.py --preset tiny --workdir /tmp/deranj/fig2

Stages (each training run through gin, skipped when already finished):
  1. SFT from the preset's INIT_CHECKPOINT (the shipped tiny T5 for smoke/tiny);
  2. PPO at β from the SFT model (`configs/runs/ppo_length.gin`): the aligned model;
  3. PPO at β/λ for every λ ≠ 1 of the grid: the retrained models;
  4. one DeRa sweep over the whole grid from (SFT, aligned), a single compiled sampler;
  5. samples of every retrained model, and importance-resampled DeRa (the exact mixture);
  6. length reward and length distributions of each, written to fig2.json and fig2.png
     (panel a: reward against λ; b: DeRa's lengths; c: the retrained models' lengths).
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
from deranj import profiling  # noqa: E402
from deranj import rewards  # noqa: E402
from deranj.data import pipeline  # noqa: E402

# Per preset: λ grid, held-out prompts, samples per prompt and λ, SIR candidates.
GRIDS = {
    "smoke": dict(lams="0.5,1,2", prompts=4, samples=2, candidates=4, chunk=32),
    "tiny": dict(lams="0.25,0.5,1,2,4", prompts=42, samples=4, candidates=8, chunk=128),
    "paper": dict(lams="0.25,0.5,1,2,4", prompts=1000, samples=4, candidates=16, chunk=512),
}
RUN = "configs/runs/ppo_length.gin"


def length_stats(tokens: np.ndarray, l_min: int, l_max: int, bins: np.ndarray) -> dict:
  lengths = np.asarray(rewards.response_lengths(tokens))
  reward = np.asarray(rewards.length_reward(lengths, l_min, l_max))
  counts, _ = np.histogram(lengths, bins=bins)
  return {"length_reward": float(reward.mean()), "mean_length": float(lengths.mean()),
          "in_range": float((reward == 0).mean()), "lengths": lengths.tolist(),
          "histogram": counts.tolist()}


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = result["per_lam"]
  lams = [r["lam"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  ax = axes[0]
  ax.plot(lams, [r["dera"]["length_reward"] for r in rows], "s-", label="DeRa")
  ax.plot(lams, [r["retrained"]["length_reward"] for r in rows], "^--", label="retrained")
  ax.plot(lams, [r["dera_resampled"]["length_reward"] for r in rows], "o:", alpha=0.7,
          label="DeRa + SIR (exact mixture)")
  ax.set_xscale("log")
  ax.set_xticks(lams, [f"{x:g}" for x in lams])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("λ (retrained at β/λ)")
  ax.set_ylabel("mean length reward")
  ax.set_title(f"(a) length reward, β = {result['beta']:g}")
  ax.legend()
  lo, hi = result["length_range"]
  for ax, key, title in ((axes[1], "dera", "(b) DeRa"), (axes[2], "retrained",
                                                         "(c) retrained")):
    ax.boxplot([r[key]["lengths"] for r in rows], showfliers=False)
    ax.set_xticks(range(1, len(lams) + 1), [f"{x:g}" for x in lams])
    for y in (lo, hi):
      ax.axhline(y, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("λ")
    ax.set_ylabel("response length (tokens)")
    ax.set_title(f"{title}: length distributions")
  common.save_figure(fig, path)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(GRIDS), default="tiny")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lams", default=None, help="comma-separated λ grid (1 is added)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  grid = GRIDS[args.preset]
  lams = common.parse_lams(args.lams or grid["lams"], add_one=True)
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  macros = common.preset_macros(args.preset, ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH",
                                              "L_MIN", "L_MAX"])
  timer = common.Timer()

  sft_dir = common.run_dir(workdir, "sft")
  with timer("sft"):
    common.train("configs/runs/sft.gin", args.preset, sft_dir)
  policy_bindings = [f"INIT_CHECKPOINT = '{sft_dir}'"]
  with timer("aligned"):
    common.train(RUN, args.preset, common.run_dir(workdir, "ppo", args.beta),
                 [*policy_bindings, f"BETA = {args.beta}"])
  with timer("retrained"):
    for lam in lams:
      if lam != 1:
        common.train(RUN, args.preset, common.run_dir(workdir, "ppo", args.beta / lam),
                     [*policy_bindings, f"BETA = {args.beta / lam}"])

  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": macros["TARGETS_LENGTH"]}
  val = pipeline.load(macros["TASK"], "validation", lengths, max_examples=grid["prompts"])
  prompts = val.features["encoder_input_tokens"]
  max_len = macros["TARGETS_LENGTH"]
  bins = np.arange(0, max_len + 2)
  l_min, l_max = macros["L_MIN"], macros["L_MAX"]
  ref, ref_params = common.load_policy(sft_dir)
  _, aligned_params = common.load_policy(common.run_dir(workdir, "ppo", args.beta))
  realigner = dera.Realigner(ref, ref_params, ref, aligned_params, max_decode_len=max_len)
  rng = jax.random.PRNGKey(args.seed)

  with timer("dera_sweep"), profiling.count_compiles("_sample") as compiles:
    dera_tokens, _ = common.sample_dera(realigner, prompts, lams, grid["samples"], grid["chunk"],
                                 jax.random.fold_in(rng, 0))
  with timer("dera_resampled"):
    sir_tokens, ess = common.sample_dera(realigner, prompts, lams, grid["samples"], grid["chunk"],
                                  jax.random.fold_in(rng, 1), candidates=grid["candidates"])
  with timer("retrained_sampling"):
    retrained_tokens = []
    for lam in lams:
      _, params = (ref, aligned_params) if lam == 1 else common.load_policy(
          common.run_dir(workdir, "ppo", args.beta / lam))
      retrained_tokens.append(common.sample_model(ref, params, prompts, grid["samples"],
                                           grid["chunk"], max_len, jax.random.fold_in(rng, 2)))

  per_lam = []
  for i, lam in enumerate(lams):
    per_lam.append({
        "lam": lam, "beta_over_lam": args.beta / lam,
        "dera": length_stats(dera_tokens[i], l_min, l_max, bins),
        "retrained": length_stats(retrained_tokens[i], l_min, l_max, bins),
        "dera_resampled": {**length_stats(sir_tokens[i], l_min, l_max, bins),
                           "mean_ess": float(ess[i].mean()),
                           "num_candidates": grid["candidates"]},
    })
  reward = lambda key: [r[key]["length_reward"] for r in per_lam]  # noqa: E731
  result = {
      "figure": "2", "preset": args.preset, "beta": args.beta, "lams": lams,
      "length_range": [l_min, l_max], "num_prompts": int(len(prompts)),
      "samples_per_prompt": grid["samples"], "histogram_bins": bins.tolist(),
      "per_lam": per_lam,
      "agreement": {
          "length_reward": common.agreement(lams, reward("dera"), reward("retrained")),
          "dera_vs_resampled_mean_abs_difference": float(np.mean(np.abs(
              np.subtract(reward("dera"), reward("dera_resampled"))))),
      },
      "dera_sweep_compiles": compiles.count,
      "wall_seconds": timer.seconds,
  }
  common.write_json(os.path.join(workdir, "fig2.json"), result)
  plot(result, os.path.join(workdir, "fig2.png"))
  common.log("\n| λ | β/λ | DeRa reward | retrained reward | DeRa+SIR reward | DeRa length | "
             "retrained length |\n|---|---|---|---|---|---|---|")
  for r in per_lam:
    common.log(f"| {r['lam']:g} | {r['beta_over_lam']:.4g} | {r['dera']['length_reward']:.3f} | "
               f"{r['retrained']['length_reward']:.3f} | "
               f"{r['dera_resampled']['length_reward']:.3f} | {r['dera']['mean_length']:.1f} | "
               f"{r['retrained']['mean_length']:.1f} |")
  agree = result["agreement"]["length_reward"]
  common.log(f"\nSpearman ρ(DeRa, retrained) = {common.spearman_text(agree)}; mean |Δ| = "
             f"{agree['mean_abs_difference']:.3f}; wall {sum(timer.seconds.values()):.0f} s")
  common.log(f"figure: {os.path.join(workdir, 'fig2.png')}\n"
             f"numbers: {os.path.join(workdir, 'fig2.json')}")


if __name__ == "__main__":
  main()
