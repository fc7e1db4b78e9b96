r"""The retraining sweep over a β/λ grid: print the `python -m deranj.train` commands (to
launch on your own cluster), or run them here one after another.

    python scripts/sweep.py --run_gin configs/runs/ppo_length.gin --preset tiny \
        --workdir /tmp/deranj/fig2 --init_checkpoint /tmp/deranj/fig2/sft \
        --beta 0.1 --lams 0.25,0.5,1,2,4 [--gin.NAME=value ...] [--run]

Run λ trains at KL strength β/λ in `<workdir>/<kind>_beta<β/λ>` (the directories the
figure drivers read, kind = ppo | pg | dpo from the run file), so a driver started
afterwards skips them. With --run, runs whose final model exists are skipped.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top

KINDS = {"ppo_length": "ppo", "pg_reward": "pg", "dpo": "dpo"}


def commands(run_gin: str, preset: str, workdir: str, init_checkpoint: str, beta: float,
             lams: list[float], extra: list[str]) -> list[tuple[str, str]]:
  """(model_dir, command) per λ."""
  stem = os.path.splitext(os.path.basename(run_gin))[0]
  if stem not in KINDS:
    raise SystemExit(f"error: --run_gin={run_gin}: expected one of "
                     f"{[f'configs/runs/{k}.gin' for k in KINDS]}.")
  out = []
  for lam in lams:
    model_dir = common.run_dir(os.path.abspath(workdir), KINDS[stem], beta / lam)
    bindings = [f"INIT_CHECKPOINT = '{os.path.abspath(init_checkpoint)}'",
                f"BETA = {beta / lam!r}", *extra]
    out.append((model_dir, common.train_command(run_gin, preset, model_dir, bindings)))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run_gin", required=True)
  parser.add_argument("--preset", choices=sorted(common.PRESET_FILES), required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--init_checkpoint", required=True, help="the SFT run (or model)")
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lams", default="0.25,0.5,1,2,4")
  parser.add_argument("--run", action="store_true", help="run the commands here, in turn")
  args, rest = parser.parse_known_args(argv)
  extra = []
  for arg in rest:
    if not arg.startswith("--gin.") or "=" not in arg:
      raise SystemExit(f"error: unexpected argument {arg!r} (extra settings: --gin.NAME=value)")
    name, value = arg[len("--gin."):].split("=", 1)
    extra.append(f"{name} = {value}")
  todo = commands(args.run_gin, args.preset, args.workdir, args.init_checkpoint, args.beta,
                  common.parse_lams(args.lams), extra)
  for model_dir, command in todo:
    if not args.run:
      print(command)
      continue
    if common.checkpoints.is_finished(model_dir):
      print(f"# {model_dir}: finished, skipped", flush=True)
      continue
    print(f"# {command}", flush=True)
    subprocess.run(command, shell=True, check=True, cwd=common.REPO)


if __name__ == "__main__":
  main()
