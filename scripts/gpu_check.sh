#!/usr/bin/env bash
# Usage: bash scripts/gpu_check.sh [--dry-run] [--skip CHECKS] [--json FILE]
#
# One command for every CUDA path the CPU test suite cannot run, on one GPU, in about 8 minutes: the bf16 gate
# step against fp32, flow generation in bf16 against fp32 (top-1 agreement), FSDP2 on one GPU,
# `loraflow bench all --quick` on CUDA, and the vLLM engine when it is installed. It prints one summary table and
# exits non-zero when a check fails. --dry-run runs the CPU-safe parts on the CPU (the test suite does this).
#
#   PYTHON [the repository's .venv/bin/python if it exists, else python3]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # the check builds its models in-process; nothing to download
PYTHON="${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}"
exec "$PYTHON" -m loraflow.gpu_check "$@"
