#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Default: the fast suite, with its 15 slowest tests listed. Long end-to-end runs: bash scripts/test.sh -m slow
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow" --durations=15)
exec python -m pytest -q "${args[@]}" tests
