#!/usr/bin/env bash
# Build the data root that training and evaluation read:
#   $OUT/{train,dev,test}/{lang}_{task}_{split}.jsonl  +  $OUT/system_prompts.json
# from the LoRA-Flow release (thunlp/LoRAFlow, folder data/) and MGSM (google-research/url-nlp, folder mgsm/).
# All the work (validation, record counts, atomic no-clobber writes, the summary table) is done by
# `python -m loraflow.cli data prepare`; this script only finds or downloads the sources.
#
# Usage: bash scripts/prepare_data.sh        e.g. DATA_SRC=../shared/data/loraflow MGSM_SRC=../shared/data/mgsm
#
# Variables (defaults in brackets; relative paths are relative to the repository root):
#   DATA_SRC    [unset]   a local folder laid out like the release's data/ (train/ dev/ test/ system_prompts.json).
#                         Unset: download it from $LORAFLOW_REPO with git (sparse checkout of data/) or curl.
#   MGSM_SRC    [unset]   a local folder of mgsm_{lang}.tsv. Unset: download the MGSM_LANGS files from $MGSM_URL.
#   MGSM_LANGS  [en]      comma-separated MGSM languages converted to test/{lang}_math_test.jsonl; "" = none.
#                         Languages the release already has (zh, ru, es) keep the release's file.
#   OUT         [data]    where the data root is built
#   FORCE       [0]       1 = replace existing files whose content differs (otherwise that is an error)
#   PYTHON      [.venv/bin/python if it exists, else python3] the interpreter with loraflow importable
#   LORAFLOW_REPO [https://github.com/thunlp/LoRAFlow]
#   MGSM_URL    [https://raw.githubusercontent.com/google-research/url-nlp/main/mgsm]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

DATA_SRC="${DATA_SRC:-}"
MGSM_SRC="${MGSM_SRC:-}"
MGSM_LANGS="${MGSM_LANGS-en}"
OUT="${OUT:-data}"
FORCE="${FORCE:-0}"
PYTHON="${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}"
LORAFLOW_REPO="${LORAFLOW_REPO:-https://github.com/thunlp/LoRAFlow}"
MGSM_URL="${MGSM_URL:-https://raw.githubusercontent.com/google-research/url-nlp/main/mgsm}"

TMP=""
cleanup() { if [ -n "$TMP" ]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT
run() { echo "+ $*" >&2; "$@"; }
die() { echo "error: $*" >&2; exit 1; }

if [ -z "$DATA_SRC" ] || { [ -n "$MGSM_LANGS" ] && [ -z "$MGSM_SRC" ]; }; then
  TMP="$(mktemp -d)"
fi

if [ -z "$DATA_SRC" ]; then
  echo "[prepare_data] DATA_SRC unset: downloading the release's data/ from $LORAFLOW_REPO" >&2
  if command -v git >/dev/null 2>&1; then
    run git clone --quiet --depth 1 --filter=blob:none --sparse "$LORAFLOW_REPO" "$TMP/LoRAFlow" \
      && run git -C "$TMP/LoRAFlow" sparse-checkout set data \
      || die "could not download $LORAFLOW_REPO (no network?). Download its data/ folder yourself and rerun with DATA_SRC=<that folder>"
  else
    run curl -fsSL "$LORAFLOW_REPO/archive/HEAD.tar.gz" -o "$TMP/LoRAFlow.tar.gz" \
      && mkdir -p "$TMP/LoRAFlow" && run tar -xzf "$TMP/LoRAFlow.tar.gz" -C "$TMP/LoRAFlow" --strip-components=1 \
      || die "could not download $LORAFLOW_REPO (no network?). Download its data/ folder yourself and rerun with DATA_SRC=<that folder>"
  fi
  DATA_SRC="$TMP/LoRAFlow/data"
fi

if [ -n "$MGSM_LANGS" ] && [ -z "$MGSM_SRC" ]; then
  echo "[prepare_data] MGSM_SRC unset: downloading mgsm_{$MGSM_LANGS}.tsv from $MGSM_URL" >&2
  MGSM_SRC="$TMP/mgsm"
  mkdir -p "$MGSM_SRC"
  for lang in ${MGSM_LANGS//,/ }; do
    run curl -fsSL "$MGSM_URL/mgsm_$lang.tsv" -o "$MGSM_SRC/mgsm_$lang.tsv" \
      || die "could not download $MGSM_URL/mgsm_$lang.tsv (no network?). Rerun with MGSM_SRC=<folder of mgsm_{lang}.tsv>"
  done
fi

args=(-m loraflow.cli data prepare --src "$DATA_SRC" --out-dir "$OUT" --mgsm-langs "$MGSM_LANGS")
if [ -n "$MGSM_SRC" ]; then args+=(--mgsm-src "$MGSM_SRC"); fi
if [ "$FORCE" = 1 ]; then args+=(--force); fi
run "$PYTHON" "${args[@]}"
