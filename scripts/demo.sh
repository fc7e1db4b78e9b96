#!/usr/bin/env bash
# The main job: bash scripts/demo.sh [--workdir DIR]
# Creates .venv if missing, installs deranj, and reproduces Figure 2 on the tiny preset:
# SFT of the shipped tiny T5 -> PPO with the length reward at beta=0.1 -> PPO retrained at
# beta/lam for lam in {0.25, 0.5, 2, 4} -> one DeRa sweep -> runs/fig2_tiny/fig2.{png,json}.
# Re-running skips the training runs that finished.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
args=("$@")
[[ " ${args[*]-} " == *" --workdir"* ]] || args+=(--workdir "$ROOT/runs/fig2_tiny")
exec python experiments/fig2_length_reward.py --preset tiny "${args[@]}"
