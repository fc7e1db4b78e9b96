#!/usr/bin/env bash
# Creates .venv (if missing) and installs deranj into it; sourced by test.sh and demo.sh.
# Usage: source scripts/setup_env.sh [EXTRAS]   e.g. EXTRAS=test
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[deranj] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
extras="${1:-}"
target="."
[ -n "$extras" ] && target=".[$extras]"
# Re-install only when setup.py changed since the last install.
stamp=".venv/.deranj-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[deranj] installing -e $target (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e "$target"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
