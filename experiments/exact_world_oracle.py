r"""How close the exact world's T5 gets to pi*(beta) with exact gradients (no sampling).

    python experiments/exact_world_oracle.py --workdir runs/exact_tiny --objective ppo \
        --beta 0.25,1 --steps 600

For each beta: Adam from the SFT model on the exact KL(pi_theta || pi*(beta)) over the
whole world (`exact.fit_by_exact_gradient`), with the objective's reward, learning rate
and step count, beside the trainer's own final KL from W/exact_world.json. A trainer
ending near the oracle is limited by how fast this network can move there, not by a
defect; one far above it is suspect. Needs a finished `experiments/exact_world.py` run
in W; writes W/oracle.json (entries merged by objective and beta).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top

common.setup_path()

from deranj import dera  # noqa: E402
from deranj import exact  # noqa: E402
from experiments import exact_world  # noqa: E402

LEARNING_RATES = {"pg": "PG_LEARNING_RATE", "ppo": "PPO_LEARNING_RATE",
                  "dpo": "DPO_LEARNING_RATE"}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--preset", choices=sorted(exact_world.PRESETS), default="tiny")
  parser.add_argument("--objective", choices=sorted(exact_world.OBJECTIVES), required=True)
  parser.add_argument("--beta", required=True, help="comma-separated, e.g. 0.25,1")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="default: the objective's rate in the preset")
  parser.add_argument("--eval_every", type=int, default=50)
  args = parser.parse_args(argv)
  try:
    betas = dera.parse_lams(args.beta, positive=True, flag="--beta")
  except ValueError as e:
    parser.error(str(e))
  workdir = os.path.abspath(args.workdir)
  tables, result_path = (os.path.join(workdir, f) for f in ("tables.npz", "exact_world.json"))
  for path in (tables, os.path.join(workdir, "sft")):
    if not os.path.exists(path):
      parser.error(f"{path} is missing: run experiments/exact_world.py --workdir {workdir} "
                   "first.")
  preset = f"exact_{args.preset}"
  rate = args.learning_rate or common.preset_macros(
      preset, [LEARNING_RATES[args.objective]])[LEARNING_RATES[args.objective]]
  world, logp_ref, rewards = exact.load_tables(tables)
  reward = exact_world.OBJECTIVES[args.objective][1]
  model, params = common.load_policy(os.path.join(workdir, "sft"))
  trained = {}
  if os.path.exists(result_path):
    with open(result_path) as f:
      trained = json.load(f)["runs"]

  out_path = os.path.join(workdir, "oracle.json")
  entries = {}
  if os.path.exists(out_path):
    with open(out_path) as f:
      entries = {(e["objective"], e["beta"]): e for e in json.load(f)["entries"]}
  timer = common.Timer()
  for beta in betas:
    with timer(f"beta {beta:g}"):
      target = exact.optimal_policy(logp_ref, rewards[reward], beta)
      _, curve = exact.fit_by_exact_gradient(model, params, world, target, steps=args.steps,
                                             learning_rate=rate, eval_every=args.eval_every)
    run = trained.get(os.path.basename(common.run_dir(workdir, args.objective, beta)))
    entries[(args.objective, beta)] = {
        "objective": args.objective, "reward": reward, "beta": beta, "steps": args.steps,
        "learning_rate": rate, "oracle_final_kl": curve[-1][1], "oracle_curve": curve,
        "trainer_final_kl": run["final_kl"] if run else None}
    common.log(f"{args.objective} β = {beta:g}: oracle KL to π*(β) after {args.steps} exact "
               f"steps {curve[-1][1]:.4f}"
               + (f", trainer {run['final_kl']:.4f}" if run else " (no trainer run)"))
  common.write_json(out_path, {"entries": sorted(
      entries.values(), key=lambda e: (e["objective"], e["beta"]))})
  common.log(f"wrote {out_path} ({sum(timer.seconds.values()):.0f} s)")
  return entries


if __name__ == "__main__":
  main()
