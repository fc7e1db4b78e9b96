#!/usr/bin/env bash
# Rebuilds the tiny pretrained T5 that deranj ships (deranj/assets/tiny_t5.msgpack/.json):
# span corruption on the embedded prose, ~15 minutes on 2 CPU cores. Rebuild the
# tokenizer first (python scripts/build_tokenizer.py) only if the corpora changed.
# Usage: bash scripts/pretrain_tiny.sh [flags of scripts/pretrain_tiny.py]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python scripts/pretrain_tiny.py "$@"
