#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh: pinned to constraints.txt, as the demo) and run the whole test
# suite on CPU, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gate -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh dev | tail -n 1)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ $PY -m ruff check ." >&2
"$PY" -m ruff check .
echo "+ $PY -m pytest $*" >&2
exec "$PY" -m pytest "$@"
