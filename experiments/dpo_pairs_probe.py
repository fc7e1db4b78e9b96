r"""Can DPO learn Figure 7's gold preferences from more pairs? A diagnostic for Figure 7.

    python experiments/dpo_pairs_probe.py --preset tiny --workdir /tmp/deranj/figs \
        [--pairs_per_prompt 4 --beta 0.1 --steps 400 --out DIR]

Reads a Figure 3/7 work directory of the same --preset (its `sft`, `gold_rm` and
`pairs/validation.jsonl`, made by experiments/fig7_dpo.py), writes OUT/pairs/train.jsonl
with --pairs_per_prompt pairs per training prompt (2K SFT samples, labelled by the gold
reward's Bradley-Terry model as `stages.make_pairs` labels them, the same held-out
pairs), trains DPO on them (configs/runs/dpo.gin, evaluating every --eval_every steps
on the held-out pairs) and writes OUT/probe.json: each evaluation's held-out loss and
accuracy. The run's own [train] lines show the training accuracy; over the first epoch
its pairs are unseen, a second held-out measure.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import stages  # noqa: E402

PROBE_SAMPLES = 102  # the numpy/JAX stream of this probe's SFT samples


def make_pairs(figures: stages.Context, probe: stages.Context, pairs_per_prompt: int,
               seed: int) -> dict:
  """The probe's pairs/{train,validation}.jsonl and labels.json; the training split's
  labelling statistics."""
  from deranj.data import pipeline, preferences  # pylint: disable=g-import-not-at-top
  from deranj.evaluation import judges  # pylint: disable=g-import-not-at-top
  from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
  macros = common.preset_macros(figures.preset, ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH",
                                                 "PAIR_PROMPTS", "FIG_CHUNK"])
  validation = os.path.join(figures.pairs_dir, "validation.jsonl")
  if not os.path.isfile(validation):
    raise SystemExit(f"error: {validation} is missing: run experiments/fig7_dpo.py with "
                     f"--workdir {figures.workdir} first (its stage 3 makes the pairs).")
  gold = judges.RewardModelJudge(*reward_model.load_reward_model(figures.gold_dir),
                                 batch_size=int(macros["FIG_CHUNK"]))
  sft = common.load_policy(figures.sft_dir)
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": macros["TARGETS_LENGTH"]}
  data = pipeline.load(macros["TASK"], "train", lengths, max_examples=macros["PAIR_PROMPTS"])
  common.log(f"   labelling {pairs_per_prompt} pairs of SFT samples for each of "
             f"{len(data.features['prompts'])} prompts")
  pairs, stats = stages.sampled_pairs(
      sft, gold, data, pairs_per_prompt, int(macros["FIG_CHUNK"]), macros["TARGETS_LENGTH"],
      jax.random.fold_in(jax.random.PRNGKey(seed), PROBE_SAMPLES),
      seed=(seed, stages.PAIR_LABELS, 0))
  os.makedirs(probe.pairs_dir, exist_ok=True)
  common.write_json(os.path.join(probe.pairs_dir, stages.LABELS_FILE), {"train": stats})
  shutil.copy(validation, os.path.join(probe.pairs_dir, "validation.jsonl"))
  preferences.write_pairs(os.path.join(probe.pairs_dir, "train.jsonl"), pairs)
  return stats


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(common.PRESET_FILES), default="tiny")
  parser.add_argument("--workdir", required=True, help="a Figure 3/7 work directory")
  parser.add_argument("--out", default=None, help="default: WORKDIR/dpo_pairs_probe")
  parser.add_argument("--pairs_per_prompt", type=int, default=4)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--eval_every", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.pairs_per_prompt < 1 or args.steps < 1 or args.eval_every < 1:
    parser.error("--pairs_per_prompt, --steps and --eval_every must be >= 1.")
  out = args.out or os.path.join(args.workdir, "dpo_pairs_probe")
  figures, probe = stages.Context(args.preset, args.workdir), stages.Context(args.preset, out)
  made = os.path.isfile(os.path.join(probe.pairs_dir, "train.jsonl"))
  stats = (stages.reused_probe_pairs(probe.pairs_dir, args.pairs_per_prompt) if made
           else make_pairs(figures, probe, args.pairs_per_prompt, args.seed))
  run_dir = common.run_dir(out, "dpo", args.beta)
  common.train("configs/runs/dpo.gin", args.preset, run_dir, [
      f"INIT_CHECKPOINT = '{figures.sft_dir}'", *probe.pair_bindings(),
      f"BETA = {args.beta}", f"DPO_STEPS = {args.steps}",
      f"train.eval_every = {args.eval_every}"])
  evals = common.read_evals(run_dir)
  result = {"pairs": stats, "pairs_per_prompt": args.pairs_per_prompt, "beta": args.beta,
            "steps": args.steps, "run": run_dir,
            "held_out": [{"step": e["step"], "loss": e.get("loss"),
                          "accuracy": e.get("rewards/accuracies")} for e in evals]}
  common.write_json(os.path.join(out, "probe.json"), result)
  common.log("| step | held-out DPO loss | held-out accuracy |\n|---:|---:|---:|")
  for e in result["held_out"]:
    common.log(f"| {e['step']} | {e['loss']:.4f} | {e['accuracy']:.3f} |")
  return result


if __name__ == "__main__":
  main()
