#!/usr/bin/env bash
# The README's first command: set up the environment and run loraflow's main job end to end on the embedded
# default (loraflow/demo): a synthetic two-skill world, a tiny Llama pretrained on the spot, a language LoRA and a
# task LoRA, a LoRA-Flow gate trained with `loraflow train`, LoRA-Hub, every method scored with the MGSM scorer,
# the paper-style table and the gate-weight plots. No GPU, model hub or dataset download needed.
#
# Usage: bash scripts/demo.sh [extra `loraflow demo` flags, e.g. --seed 1]
# Variables (defaults in brackets):
#   DEMO_SIZE [full]   full (about 15 minutes on 2 CPU cores) or small (the CI-sized run: a minute or two)
#   OUT       [outputs/demo, outputs/demo-small]   where every stage is cached; a rerun skips finished stages
#   VENV, PYTHON, TORCH_SPEC, TORCH_INDEX_URL: see scripts/setup_env.sh (the CPU torch wheel when no GPU is seen)
#   OMP_NUM_THREADS    torch threads; on a machine shared with other jobs, 1 can be several times faster
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${DEMO_SIZE:-full}"
case "$SIZE" in full|small) ;; *) echo "error: DEMO_SIZE must be full or small, got '$SIZE'" >&2; exit 2;; esac
OUT="${OUT:-outputs/demo$([ "$SIZE" = full ] || echo "-$SIZE")}"
# No GPU: take torch from PyTorch's CPU index (the small +cpu wheel, not the CUDA build PyPI serves on Linux).
if [ -z "${TORCH_INDEX_URL+x}" ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  export TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
fi
echo "[demo] setting up the environment (scripts/setup_env.sh demo)" >&2
PY="$(bash scripts/setup_env.sh demo | tail -n 1)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ASSETS=()
if [ "$SIZE" = full ]; then ASSETS=(--assets assets); fi
echo "+ $PY -m loraflow.cli demo --size $SIZE --out-dir $OUT ${ASSETS[*]} $*" >&2
start=$(date +%s)
"$PY" -m loraflow.cli demo --size "$SIZE" --out-dir "$OUT" "${ASSETS[@]}" "$@"
echo "[demo] finished in $(( $(date +%s) - start )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))" >&2
