r"""How much of the gold reward does Figure 3's proxy reward model learn from K pairs per
prompt? A diagnostic for Figure 3.

    python experiments/proxy_rm_probe.py --preset tiny_pairs32 --workdir /tmp/deranj/k32 \
        --pairs_per_prompt 1 --steps 200 [--out DIR --eval_samples 8]

Reads a Figure 3/7 work directory (its `sft`, `gold_rm` and `pairs/`, made by
experiments/fig7_dpo.py or fig3_policy_gradient.py), writes OUT/pairs/train.jsonl with the
first --pairs_per_prompt of its pairs per training prompt (at most the directory's own
count; the same held-out pairs), trains the proxy reward model on them as Figure 3 does
(configs/runs/reward_model.gin from the SFT model, --steps steps, five evaluations) and
writes OUT/probe.json:
  - each evaluation's accuracy on the held-out pairs (their noisy labels);
  - gold agreement: --eval_samples fresh SFT samples for each test prompt, scored by the
    gold and the proxy reward models; the share of same-prompt sample pairs of distinct
    gold reward that the proxy orders as gold does (0.5: no gold signal; the labels
    themselves agree with gold on 1 - chosen_lower_gold of their pairs), and the mean
    per-prompt Spearman correlation of the two rewards.
Policy gradient can only raise the gold reward through what the proxy shares with it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import stages  # noqa: E402

PROBE_SAMPLES = 103  # the JAX stream of this probe's SFT samples (dpo_pairs_probe: 102)


def first_pairs(figures: stages.Context, probe: stages.Context, pairs_per_prompt: int) -> dict:
  """Writes the probe's pairs (the first `pairs_per_prompt` of each training prompt's
  pairs in `figures`, the same held-out pairs) unless they exist; their statistics."""
  from deranj.data import preferences  # pylint: disable=g-import-not-at-top
  labels = stages.check_labels_file(figures.pairs_dir)
  made = labels.get("train", {}).get("pairs_per_prompt", 1)
  if not 1 <= pairs_per_prompt <= made:
    raise SystemExit(f"error: --pairs_per_prompt {pairs_per_prompt}: {figures.pairs_dir} "
                     f"holds {made} pair(s) per training prompt; give 1..{made}.")
  path = os.path.join(probe.pairs_dir, stages.LABELS_FILE)
  if os.path.isfile(path):
    return stages.reused_probe_pairs(probe.pairs_dir, pairs_per_prompt, figures.pairs_dir)
  pairs = preferences.read_pairs(os.path.join(figures.pairs_dir, "train.jsonl"))
  kept = [p for i, p in enumerate(pairs) if i % made < pairs_per_prompt]  # prompt-major
  stats = {"from": figures.pairs_dir, "prompts": labels["train"]["prompts"],
           "pairs": len(kept), "pairs_per_prompt": pairs_per_prompt}
  os.makedirs(probe.pairs_dir, exist_ok=True)
  shutil.copy(os.path.join(figures.pairs_dir, "validation.jsonl"),
              os.path.join(probe.pairs_dir, "validation.jsonl"))
  preferences.write_pairs(os.path.join(probe.pairs_dir, "train.jsonl"), kept)
  # Last: a labels file names finished pairs; it keeps the figure's rule and split stats.
  common.write_json(path, {**labels, "train": stats})
  return stats


def ordering_agreement(gold: np.ndarray, proxy: np.ndarray) -> dict:
  """Over prompts (rows of [P, M] rewards): the share of same-prompt pairs of distinct
  gold reward that `proxy` orders as `gold` (proxy ties count a half), and the mean
  per-prompt Spearman correlation (prompts where either side is constant left out)."""
  from deranj.evaluation import win_rates  # pylint: disable=g-import-not-at-top
  gold, proxy = np.asarray(gold, np.float64), np.asarray(proxy, np.float64)
  i, j = np.triu_indices(gold.shape[1], k=1)
  dg, dp = gold[:, i] - gold[:, j], proxy[:, i] - proxy[:, j]
  distinct = dg != 0
  same = np.where(dp == 0, 0.5, (np.sign(dp) == np.sign(dg)).astype(np.float64))
  rhos = [win_rates.spearman_test(g, p).rho for g, p in zip(gold, proxy)]
  rhos = [r for r in rhos if np.isfinite(r)]
  return {"pairs": int(distinct.sum()), "agreement": float(same[distinct].mean()),
          "mean_spearman": float(np.mean(rhos)) if rhos else None,
          "prompts_with_spearman": len(rhos)}


def gold_agreement(figures: stages.Context, proxy_dir: str, samples: int, seed: int) -> dict:
  """`ordering_agreement` of the proxy with gold on `samples` fresh SFT samples for each
  of the preset's test prompts (SUMMARIZATION_PROMPTS)."""
  from deranj.data import pipeline  # pylint: disable=g-import-not-at-top
  from deranj.evaluation import judges  # pylint: disable=g-import-not-at-top
  from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
  macros = common.preset_macros(figures.preset, ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH",
                                                 "SUMMARIZATION_PROMPTS", "FIG_CHUNK"])
  chunk, max_len = int(macros["FIG_CHUNK"]), macros["TARGETS_LENGTH"]
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": max_len}
  prompts = pipeline.load(macros["TASK"], "test", lengths,
                          max_examples=macros["SUMMARIZATION_PROMPTS"]).features["prompts"]
  model, params = common.load_policy(figures.sft_dir)
  tokens = stages.sample_model(model, params, prompts, samples, chunk, max_len,
                               jax.random.fold_in(jax.random.PRNGKey(seed), PROBE_SAMPLES))
  rows = np.repeat(prompts, samples, axis=0)
  score = lambda d: judges.RewardModelJudge(*reward_model.load_reward_model(d),
                                            batch_size=chunk).rewards(rows, tokens)
  shape = (len(prompts), samples)
  return {"prompts": int(len(prompts)), "samples_per_prompt": samples,
          **ordering_agreement(score(figures.gold_dir).reshape(shape),
                               score(proxy_dir).reshape(shape))}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(common.PRESET_FILES), default="tiny")
  parser.add_argument("--workdir", required=True, help="a Figure 3/7 work directory")
  parser.add_argument("--out", default=None,
                      help="default: WORKDIR/proxy_rm_probe_k<pairs_per_prompt>")
  parser.add_argument("--pairs_per_prompt", type=int, default=1)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--eval_samples", type=int, default=8,
                      help="fresh SFT samples per test prompt for the gold agreement")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.eval_samples < 2:
    parser.error("--steps must be >= 1 and --eval_samples >= 2.")
  out = args.out or os.path.join(args.workdir, f"proxy_rm_probe_k{args.pairs_per_prompt}")
  figures, probe = stages.Context(args.preset, args.workdir), stages.Context(args.preset, out)
  stats = first_pairs(figures, probe, args.pairs_per_prompt)
  run_dir = common.run_dir(out, "proxy_rm")
  common.train(stages.RM_RUN, args.preset, run_dir, [
      f"INIT_CHECKPOINT = '{figures.sft_dir}'", *probe.pair_bindings(),
      f"RM_STEPS = {args.steps}", f"train.eval_every = {-(-args.steps // 5)}"])
  evals = common.read_evals(run_dir)
  agreement = gold_agreement(figures, run_dir, args.eval_samples, args.seed)
  result = {"pairs": stats, "pairs_per_prompt": args.pairs_per_prompt, "steps": args.steps,
            "run": run_dir, "gold_agreement": agreement,
            "held_out": [{"step": e["step"], "loss": e.get("loss"),
                          "accuracy": e.get("accuracy")} for e in evals]}
  common.write_json(os.path.join(out, "probe.json"), result)
  common.log(f"K = {args.pairs_per_prompt} ({stats['pairs']} pairs), {args.steps} steps: "
             f"the proxy orders {agreement['agreement']:.3f} of {agreement['pairs']} "
             f"same-prompt SFT sample pairs as gold does (mean Spearman "
             f"{agreement['mean_spearman']:.3f})")
  for e in result["held_out"]:
    common.log(f"  step {e['step']}: held-out loss {e['loss']:.4f}, accuracy "
               f"{e['accuracy']:.3f}")
  return result


if __name__ == "__main__":
  main()
