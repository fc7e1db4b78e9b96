#!/usr/bin/env bash
# The main job: bash scripts/demo.sh
# Creates .venv if missing, installs deranj, and runs a DeRa demo between two small T5s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python scripts/demo_dera.py "$@"
