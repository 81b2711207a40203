#!/usr/bin/env bash
# Download the released LoRA-Flow LoRAs and gates into $CHECKPOINT_DIR, check their shapes, and convert each gate
# to a loraflow gate beside the original. A thin wrapper over `loraflow prepare-models` (loraflow/release.py).
#
#   $CHECKPOINT_DIR/LoRAs/{zh,ru,es,math,code}_lora/   PEFT adapters, as released
#   $CHECKPOINT_DIR/Gates/{lang}_{task}.pt             original gates, as released
#   $CHECKPOINT_DIR/Gates/{lang}_{task}/gate.safetensors + gate.json   the converted loraflow gates
#   $CHECKPOINT_DIR/BM_LoRAs/{zh,ru,es,math,code}/     BMTrain/ModelCenter LoRAs (CONVERT_BMTRAIN=1 only)
#
# Idempotent: a rerun checks the sha256 of what is there against .loraflow-manifest.json, skips it and says so;
# interrupted downloads resume. Offline (HF_HUB_OFFLINE=1 or no network) with files missing, it stops at once and
# says how to supply them by hand. Relative paths are taken from the repository root.
#
# Variables (defaults in brackets):
#   HF_TOKEN        [unset]   hub token, only needed for gated repos (Llama-2's config.json); alternatively run
#                             `hf auth login` once. Export it in your shell; never write it into this file.
#   BASE_MODEL      [meta-llama/Llama-2-7b-hf]  hub id or local folder; only its config.json is read (for the
#                             shape checks), never the weights. Empty: skip the checks against the base model.
#   REPO            [Bowen232/LoRA-Flow]  hub repo id, or a local folder laid out like the release
#   REVISION        [main]    hub branch, tag or commit
#   CHECKPOINT_DIR  [checkpoints]
#   ONLY            [all]     a subset, e.g. ONLY="zh_lora math_lora zh_math"
#                             (names: zh_lora ru_lora es_lora math_lora code_lora zh_math zh_code ru_math ...)
#   CONVERT_BMTRAIN [0]       1 = also write the BMTrain/ModelCenter form of each LoRA to BM_LoRAs/
#   PYTHON          [.venv/bin/python if it exists, else python3] the interpreter with loraflow's dependencies
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

PYTHON="${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}"
BASE_MODEL="${BASE_MODEL-meta-llama/Llama-2-7b-hf}"
REPO="${REPO:-Bowen232/LoRA-Flow}"
REVISION="${REVISION:-}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-checkpoints}"
ONLY="${ONLY:-}"
CONVERT_BMTRAIN="${CONVERT_BMTRAIN:-0}"

cmd=("$PYTHON" -m loraflow.cli prepare-models --repo "$REPO" --checkpoint-dir "$CHECKPOINT_DIR"
     --base-model "$BASE_MODEL")
if [ -n "$REVISION" ]; then cmd+=(--revision "$REVISION"); fi
if [ -n "$ONLY" ]; then read -r -a only <<< "$ONLY"; cmd+=(--only "${only[@]}"); fi
if [ "$CONVERT_BMTRAIN" = 1 ]; then cmd+=(--convert-bmtrain); fi

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
