#!/usr/bin/env bash
# Train the LoRA-Flow gates of one language–task pair: the original interface, a thin wrapper over `loraflow train`.
#
# Usage: [VAR=value ...] bash scripts/train.sh <language> <task> <lr> <batch_per_device> <master_port> [extra flags]
#   e.g. CUDA_VISIBLE_DEVICES=0,1 bash scripts/train.sh zh math 1e-3 2 12350
#        (2 GPUs × 2 per device × FREQ 1 = total batch 4, the published zh-math setting)
#   Extra flags go to `loraflow train` unchanged (see `loraflow train --help`), e.g. --resume or --limit 16.
#
# The original recipe by default: the CoT phrase 让我们一步一步地思考。 after [/INST] of every training example
# (--no-cot-suffix drops it) and the best epoch chosen by the dev metric, scored as the original did (generation on
# the dev set after each epoch, fp32; --select dev-loss is the cheap alternative, --select dev-metric-strict the
# strict scoring). For code that runs the programs the model writes (loraflow's sandbox): this script passes
# --allow-code-execution for code and says so. --schedule original: the original's step count (SPEC §2).
#
# Processes: one per id in CUDA_VISIBLE_DEVICES (every visible GPU when it is unset). Without a GPU (no nvidia-smi,
# or a CPU-only torch): NPROC CPU processes with the gloo backend. Total batch = batch_per_device × processes × FREQ.
#
# Variables (defaults in brackets):
#   FREQ        [1]                           gradient accumulation: micro-batches per optimizer step
#   EPOCHS      [5]                           passes over the 200 training examples
#   BASE_MODEL  [meta-llama/Llama-2-7b-hf]    base model folder or hub id (its tokenizer is used)
#   LORA_ROOT   [checkpoints/LoRAs]           the LoRAs are $LORA_ROOT/<language>_lora and $LORA_ROOT/<task>_lora
#   DATA_ROOT   [data]                        train/ dev/ system_prompts.json (bash scripts/prepare_data.sh)
#   OUT_DIR     [checkpoints/gates]           run folder $OUT_DIR/<language>_<task>/, best gate $OUT_DIR/<language>_<task>.safetensors
#   MAX_LEN     [4096]                        longest example in tokens (longer prompts are cut from the left)
#   PROMPT_STYLE [faithful]                   faithful (= llama2-chat: the original [INST] prompts, for Llama-2)
#                                             or chat-template (the tokenizer's own, for other base models)
#   MAX_STEPS   [all]                         stop after N optimizer steps (smoke tests; --resume finishes later)
#   LIMIT       [all]                         train on the first N examples only
#   SEED        [0]                           data order and dropout seed
#   GRAD_CKPT   [0]                           1 = gradient checkpointing (less memory, more compute)
#   FSDP        [0]                           1 = shard the frozen base over the processes (FSDP2)
#   NPROC       [1]                           CPU processes when there is no GPU
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]   passed to torchrun for multi-node runs
#   (master_port 0 picks a free port, one node only)
#   PYTHON      [.venv/bin/python if it exists, else python3]   the interpreter whose torch and loraflow are used
#   TORCHRUN    [$PYTHON -m loraflow.launch]  the launcher: torchrun's, but a worker's bad-input error is printed as
#                                             the last line (`error: ...`, exit status 2) instead of torchrun's report
set -euo pipefail

if [ "$#" -lt 5 ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
# this checkout's loraflow, whether or not it is pip-installed; paths stay relative to where you run the script
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LANGUAGE="$1" TASK="$2" LR="$3" BATCH_PER_DEVICE="$4" MASTER_PORT="$5"
shift 5

FREQ="${FREQ:-1}"
EPOCHS="${EPOCHS:-5}"
BASE_MODEL="${BASE_MODEL:-meta-llama/Llama-2-7b-hf}"
LORA_ROOT="${LORA_ROOT:-checkpoints/LoRAs}"
DATA_ROOT="${DATA_ROOT:-data}"
OUT_DIR="${OUT_DIR:-checkpoints/gates}"
MAX_LEN="${MAX_LEN:-4096}"
PROMPT_STYLE="${PROMPT_STYLE:-faithful}"
MAX_STEPS="${MAX_STEPS:-}"
LIMIT="${LIMIT:-}"
SEED="${SEED:-0}"
GRAD_CKPT="${GRAD_CKPT:-0}"
FSDP="${FSDP:-0}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
PYTHON="${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}"
if [ -n "${TORCHRUN:-}" ]; then read -r -a LAUNCHER <<< "$TORCHRUN"; else LAUNCHER=("$PYTHON" -m loraflow.launch); fi

# master_port: a port number; 0 picks a free one on this machine (torchrun given 0 itself would hang its workers)
# (more than 5 digits is refused before the arithmetic, which would overflow on ~19)
case "$MASTER_PORT" in ''|*[!0-9]*|??????*) PORT_OK=0 ;; *) PORT_OK=$(( 10#$MASTER_PORT <= 65535 )) ;; esac
if [ "$PORT_OK" != 1 ]; then
  echo "error: master_port (argument 5) must be a port number 1-65535, or 0 for a free one; got '$MASTER_PORT'" >&2; exit 2
fi
if [ "$((10#$MASTER_PORT))" = 0 ]; then
  if [ "$NNODES" != 1 ]; then
    echo "error: master_port 0 (a free port) needs NNODES=1: every node must be given the same port, got NNODES=$NNODES" >&2; exit 2
  fi
  MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  echo "[train.sh] master_port 0: using the free port $MASTER_PORT" >&2
fi

if command -v nvidia-smi >/dev/null 2>&1 && "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  DEVICE=cuda
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=',' read -r -a GPU_IDS <<< "$CUDA_VISIBLE_DEVICES"
    NPROC="${#GPU_IDS[@]}"
  else
    NPROC="$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")"
  fi
else
  DEVICE=cpu
  NPROC="${NPROC:-1}"
fi

FLAGS=()
case "$PROMPT_STYLE" in
  faithful|llama2-chat) FLAGS+=(--prompt-style faithful) ;;  # llama2-chat: the old name
  chat-template) FLAGS+=(--prompt-style chat-template) ;;
  *) echo "error: PROMPT_STYLE=$PROMPT_STYLE: choose faithful (llama2-chat) or chat-template" >&2; exit 2 ;;
esac
[ -n "$MAX_STEPS" ] && FLAGS+=(--max-steps "$MAX_STEPS")
[ -n "$LIMIT" ] && FLAGS+=(--limit "$LIMIT")
if [ "$TASK" = code ]; then
  echo "[train.sh] code: the dev metric runs the programs the model writes (loraflow's sandbox); passing --allow-code-execution" >&2
  FLAGS+=(--allow-code-execution)
fi
[ "$GRAD_CKPT" = 1 ] && FLAGS+=(--grad-ckpt)
[ "$FSDP" = 1 ] && FLAGS+=(--fsdp)

CMD=("${LAUNCHER[@]}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
     --master_port "$MASTER_PORT" --nproc_per_node "$NPROC"
     -m loraflow.cli train
     --language "$LANGUAGE" --task "$TASK" --lr "$LR" --batch-per-device "$BATCH_PER_DEVICE" --grad-accum "$FREQ"
     --epochs "$EPOCHS" --base-model "$BASE_MODEL" --lora-root "$LORA_ROOT" --data-root "$DATA_ROOT"
     --out-dir "$OUT_DIR" --max-len "$MAX_LEN" --seed "$SEED" --device "$DEVICE" ${FLAGS[@]+"${FLAGS[@]}"} "$@")
{ printf "+"; printf " %q" "${CMD[@]}"; echo; } >&2
exec "${CMD[@]}"
