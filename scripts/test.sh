#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Default: the fast suite. Long end-to-end runs: bash scripts/test.sh -m slow
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
exec python -m pytest -q "${args[@]}" tests
