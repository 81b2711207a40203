#!/usr/bin/env bash
# Evaluate one language-task pair with one method: the original interface, over `loraflow eval`.
#
#   bash scripts/eval.sh <gpu_id> <port> <language> <task> <gate_path>
#   bash scripts/eval.sh 0 12350 zh math checkpoints/Gates/zh_math.pt          # LoRA-Flow on MGSM zh
#   METHOD=lorahub bash scripts/eval.sh 0 0 ru code -                          # LoRA-Hub on HumanEval ru
#   SPLIT=dev bash scripts/eval.sh 0 0 es math outputs/gates/es_math/epoch-3   # dev set, gate selection
#
# Arguments:
#   gpu_id     sets CUDA_VISIBLE_DEVICES (no effect on a machine without CUDA)
#   port       unused, kept so the original command lines still work: the original served the model over HTTP
#              on this port; loraflow generates in-process, no server
#   language   zh | ru | es, or any language with data (e.g. en: MGSM TSV, English HumanEval)
#   task       math | code  (test split: MGSM | HumanEval; dev split: math-dev | code-dev)
#   gate_path  the gate for METHOD=flow (a loraflow gate or an original .pt); ignored by the other methods
# Variables [defaults]:
#   SPLIT [test]  METHOD [flow]: flow | average | lorahub | lang | task | base
#   BATCH_SIZE [8]  MAX_NEW_TOKENS [512]  MAX_PROMPT_TOKENS [2048]: longer prompts keep their end  LIMIT [all]
#   TEMPERATURE [the gate file's; for an original .pt 1.1 for zh and ru math, else 1.0]  gate temperature (flow)
#   BASE_MODEL [meta-llama/Llama-2-7b-hf]  LORA_ROOT [checkpoints/LoRAs]  DATA_ROOT [data]  OUT_DIR [outputs/eval]
#   LANG_LORA [<language>_lora]  TASK_LORA [<math|code>_lora]: the two LoRAs, each a path or a name under LORA_ROOT
#   CHECK_LORA_NAMES [1]: 0 loads a gate whose gate.json names other LoRAs (--no-check-lora-names)
#   LORAHUB_BUDGET [40]  LORAHUB_EXAMPLES [all training examples]: the LoRA-Hub search (METHOD=lorahub)
#   PROMPT_STYLE [faithful]: or chat-template  NAME [the method]: run folder
#   DTYPE [float32]: the model dtype, as the original (bfloat16: about half the memory, a few greedy outputs change)
#   VARIANT [faithful]: code test only: repaired = English signatures with the translated docstrings (own run folder)
#   ENGINE [hf]: hf (transformers generate) | vllm (a vLLM engine on the method's model folder; raise BATCH_SIZE)
#   TENSOR_PARALLEL_SIZE [1]: GPUs per model with ENGINE=vllm
#   PYTHON [the repository's .venv/bin/python if it exists, else python3]
# Code tasks execute the programs the model writes (sandboxed, not a security boundary): this script passes
# --allow-code-execution for them and says so.
set -euo pipefail

if [ $# -ne 5 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
# this checkout's loraflow, whether or not it is pip-installed; paths stay relative to where you run the script
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
GPU_ID="$1"; PORT="$2"; LANGUAGE="$3"; TASK="$4"; GATE_PATH="$5"
SPLIT="${SPLIT:-test}"
METHOD="${METHOD:-flow}"
BATCH_SIZE="${BATCH_SIZE:-8}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-512}"
MAX_PROMPT_TOKENS="${MAX_PROMPT_TOKENS:-2048}"
TEMPERATURE="${TEMPERATURE:-}"
BASE_MODEL="${BASE_MODEL:-meta-llama/Llama-2-7b-hf}"
LORA_ROOT="${LORA_ROOT:-checkpoints/LoRAs}"
LANG_LORA="${LANG_LORA:-}"
TASK_LORA="${TASK_LORA:-}"
CHECK_LORA_NAMES="${CHECK_LORA_NAMES:-1}"
DATA_ROOT="${DATA_ROOT:-data}"
OUT_DIR="${OUT_DIR:-outputs/eval}"
LIMIT="${LIMIT:-}"
LORAHUB_BUDGET="${LORAHUB_BUDGET:-40}"
LORAHUB_EXAMPLES="${LORAHUB_EXAMPLES:-}"
PROMPT_STYLE="${PROMPT_STYLE:-faithful}"
NAME="${NAME:-}"
DTYPE="${DTYPE:-float32}"
VARIANT="${VARIANT:-faithful}"
ENGINE="${ENGINE:-hf}"
TENSOR_PARALLEL_SIZE="${TENSOR_PARALLEL_SIZE:-1}"
PYTHON="${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}"
export CUDA_VISIBLE_DEVICES="$GPU_ID"
# a LoRA is a path when it contains a slash or exists as given, else a name under LORA_ROOT
lora_path() { case "$1" in */*) echo "$1";; *) if [ -e "$1" ]; then echo "$1"; else echo "$LORA_ROOT/$1"; fi;; esac; }

: "$PORT"  # unused (see above)

cmd=("$PYTHON" -m loraflow.cli eval --task "$TASK" --language "$LANGUAGE" --split "$SPLIT" --method "$METHOD"
     --base-model "$BASE_MODEL" --lora-root "$LORA_ROOT" --data-root "$DATA_ROOT" --out-dir "$OUT_DIR"
     --batch-size "$BATCH_SIZE" --max-new-tokens "$MAX_NEW_TOKENS"
     --max-prompt-tokens "$MAX_PROMPT_TOKENS" --prompt-style "$PROMPT_STYLE" --dtype "$DTYPE" --engine "$ENGINE")
if [ -n "$LANG_LORA" ]; then cmd+=(--lang-lora "$(lora_path "$LANG_LORA")"); fi
if [ -n "$TASK_LORA" ]; then cmd+=(--task-lora "$(lora_path "$TASK_LORA")"); fi
if [ "$ENGINE" = vllm ]; then cmd+=(--tensor-parallel-size "$TENSOR_PARALLEL_SIZE"); fi
if [ "$METHOD" = flow ]; then
  cmd+=(--gate "$GATE_PATH")
  if [ -n "$TEMPERATURE" ]; then cmd+=(--temperature "$TEMPERATURE"); fi
  if [ "$CHECK_LORA_NAMES" = 0 ]; then cmd+=(--no-check-lora-names); fi
fi
if [ "$METHOD" = lorahub ]; then
  cmd+=(--lorahub-budget "$LORAHUB_BUDGET")
  if [ -n "$LORAHUB_EXAMPLES" ]; then cmd+=(--lorahub-examples "$LORAHUB_EXAMPLES"); fi
fi
if [ -n "$LIMIT" ]; then cmd+=(--limit "$LIMIT"); fi
if [ "$VARIANT" != faithful ]; then cmd+=(--variant "$VARIANT"); fi
if [ -n "$NAME" ]; then cmd+=(--name "$NAME"); fi
if [ "$TASK" = code ]; then
  echo "[eval.sh] code task: the generated programs will be executed (loraflow's sandbox); passing --allow-code-execution" >&2
  cmd+=(--allow-code-execution)
fi
echo "+ CUDA_VISIBLE_DEVICES=$GPU_ID ${cmd[*]}" >&2
"${cmd[@]}"
