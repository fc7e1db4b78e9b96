#!/usr/bin/env bash
# The main job: bash scripts/demo.sh [--workdir DIR]
# Creates .venv if missing, installs deranj, and runs Figure 2 on the demo preset (the tiny
# preset cut to ~15 min): SFT of the shipped tiny T5 -> policy gradient with the length
# reward at beta = 1 -> retrained at beta/lam for lam in {0.5, 2} -> one DeRa sweep ->
# runs/fig2_demo/fig2.{png,json}. Re-running skips the training runs that finished.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
args=("$@")
[[ " ${args[*]-} " == *" --workdir"* ]] || args+=(--workdir "$ROOT/runs/fig2_demo")
exec python experiments/fig2_length_reward.py --preset demo "${args[@]}"
