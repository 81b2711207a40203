#!/usr/bin/env bash
# The README's first command: set up the environment and run loraflow's main job end to end on the embedded
# default (loraflow/demo): a synthetic two-skill world, a tiny Llama pretrained on the spot, a language LoRA and a
# task LoRA, a LoRA-Flow gate trained with `loraflow train`, LoRA-Hub, every method scored with the MGSM scorer,
# the paper-style table and the gate-weight plots. No GPU, model hub or dataset download needed.
#
# Usage: bash scripts/demo.sh [extra `loraflow demo` flags, e.g. --seed 1]
# Variables (defaults in brackets):
#   DEMO_SIZE [full]   full (3 seeds at once, one process each) or small (the CI-sized run, 2 seeds: a minute or two)
#   OUT       [outputs/demo, outputs/demo-small]   where every stage is cached; a rerun skips finished stages
#   VENV, PYTHON, TORCH_SPEC, TORCH_INDEX_URL, PINNED: see scripts/setup_env.sh (the CPU torch wheel when no GPU
#                      is seen; an unreachable index is skipped after a few seconds)
#   SETUP     [1]      0: skip scripts/setup_env.sh and run with $PYTHON [python3] as it is
#   OMP_NUM_THREADS [1]  threads of anything outside torch; the demo itself always runs torch on 1 thread, so the
#                      numbers do not depend on it (a different thread count rounds differently)
# The run writes under $OUT only. `--update-assets` also copies the gate heatmap to assets/ (refreshing the README).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${DEMO_SIZE:-full}"
case "$SIZE" in full|small) ;; *) echo "error: DEMO_SIZE must be full or small, got '$SIZE'" >&2; exit 2;; esac
OUT="${OUT:-outputs/demo$([ "$SIZE" = full ] || echo "-$SIZE")}"
# No GPU: take torch from PyTorch's CPU index (the small +cpu wheel, not the CUDA build PyPI serves on Linux).
if [ -z "${TORCH_INDEX_URL+x}" ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  export TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
fi
if [ "${SETUP:-1}" = 0 ]; then
  PY="${PYTHON:-python3}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's loraflow, installed or not
else
  echo "[demo] setting up the environment (scripts/setup_env.sh demo)" >&2
  PY="$(bash scripts/setup_env.sh demo | tail -n 1)"
fi
# one thread unless the user chose: on a machine shared with other jobs, torch's default can be several times slower
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ OMP_NUM_THREADS=$OMP_NUM_THREADS $PY -m loraflow.cli demo --size $SIZE --out-dir $OUT $*" >&2
start=$(date +%s)
"$PY" -m loraflow.cli demo --size "$SIZE" --out-dir "$OUT" "$@"
echo "[demo] finished in $(( $(date +%s) - start )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))" >&2
