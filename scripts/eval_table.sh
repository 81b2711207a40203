#!/usr/bin/env bash
# Run every method on every language-task pair, then write the paper-style table beside the published numbers.
#
#   bash scripts/eval_table.sh [gpu_id]
#   PAIRS="zh_math es_code" METHODS="task flow" GATE_DIR=outputs/gates bash scripts/eval_table.sh 0
#
# Variables [defaults]:
#   PAIRS [zh_math ru_math es_math zh_code ru_code es_code]   language_task pairs
#   METHODS [base lang task average lorahub flow]
#   GATE_DIR [checkpoints/Gates]  the flow gate of a pair: GATE_DIR/{pair}.pt, GATE_DIR/{pair}.safetensors or the
#                                 folder GATE_DIR/{pair} (first found)
#   OUT_DIR [outputs/eval]        results go to OUT_DIR/..., the table to OUT_DIR/table.md
#   PYTHON [the repository's .venv/bin/python if it exists, else python3]
#   everything else (SPLIT, BASE_MODEL, LORA_ROOT, DATA_ROOT, LIMIT, ENGINE=vllm, ...) goes to scripts/eval.sh
# Finished runs are not recomputed (eval resumes), so rerunning after a failure only does what is missing.
# Code pairs execute model-written programs (see scripts/eval.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

GPU_ID="${1:-0}"
PYTHON="${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}"
export PYTHON
# the defaults are the registry's (loraflow/eval/registry.py): the released pairs, the paper's methods in row order
PAIRS="${PAIRS:-$("$PYTHON" -c 'from loraflow.eval.registry import RELEASE_LANGUAGES as L, TASK_DOMAINS as D
print(*[f"{lang}_{d}" for d in D for lang in L])')}"
METHODS="${METHODS:-$("$PYTHON" -c 'from loraflow.eval.registry import METHODS; print(*METHODS)')}"
GATE_DIR="${GATE_DIR:-checkpoints/Gates}"
export OUT_DIR="${OUT_DIR:-outputs/eval}"

failed=()
for pair in $PAIRS; do
  language="${pair%%_*}"; task="${pair#*_}"
  gate="-"
  for cand in "$GATE_DIR/$pair.pt" "$GATE_DIR/$pair.safetensors" "$GATE_DIR/$pair"; do
    if [ -e "$cand" ]; then gate="$cand"; break; fi
  done
  for method in $METHODS; do
    if [ "$method" = flow ] && [ "$gate" = "-" ]; then
      echo "[eval_table.sh] no gate for $pair under $GATE_DIR: skipping flow" >&2
      failed+=("$pair/$method"); continue
    fi
    echo "[eval_table.sh] $pair $method" >&2
    if ! METHOD="$method" bash "$HERE/eval.sh" "$GPU_ID" 0 "$language" "$task" "$gate"; then
      failed+=("$pair/$method")
    fi
  done
done

mkdir -p "$OUT_DIR"
echo "+ $PYTHON -m loraflow.cli eval-table $OUT_DIR --out $OUT_DIR/table.md" >&2
"$PYTHON" -m loraflow.cli eval-table "$OUT_DIR" --out "$OUT_DIR/table.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "[eval_table.sh] not done: ${failed[*]}" >&2
  exit 1
fi
