"""`--device` and `--dtype`: one meaning in every command (eval, train, plot-gates, bench, convert's --dtype).

- `--device`: `auto` (cuda when torch sees a GPU, else cpu) | `cpu` | `cuda` | `cuda:N`.
- `--dtype`: `auto` (bfloat16 on CUDA, float32 on CPU) | `float32` | `bfloat16` | `float16`, the dtype of the base
  model's weights (the gates stay fp32). `fp32`, `bf16`, `fp16` (the old `--precision` values) are read as aliases.
"""

from __future__ import annotations

import argparse
import re

from loraflow.errors import LoraflowError

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE_HELP = "auto (cuda when available, else cpu) | cpu | cuda | cuda:N"
DTYPE_HELP = "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16 (the gates stay fp32)"


def check_device(device: str) -> str:
    if not DEVICE.match(str(device)):
        raise LoraflowError(f"device {device!r}: use {DEVICE_HELP}")
    return str(device)


def resolve_device(device: str = "auto") -> str:
    """`auto` -> cuda or cpu; a CUDA device without CUDA is an error."""
    import torch

    device = check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoraflowError(f"device {device} asked for, but this torch sees no CUDA GPU (torch.cuda.is_available() "
                            "is False); use --device cpu")
    return device


def canonical_dtype(dtype: str) -> str:
    """`auto` or one of `DTYPES` (the aliases fp32/bf16/fp16 mapped); anything else is an error."""
    dtype = DTYPE_ALIASES.get(str(dtype), str(dtype))
    if dtype != "auto" and dtype not in DTYPES:
        raise LoraflowError(f"dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    return dtype


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bfloat16 on a CUDA device, float32 elsewhere."""
    dtype = canonical_dtype(dtype)
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


def torch_dtype(name: str):
    import torch

    return getattr(torch, canonical_dtype(name))


def _dtype_arg(text: str) -> str:
    try:
        return canonical_dtype(text)
    except LoraflowError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_arguments(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """`--device` and `--dtype` (with `--precision` as a hidden alias of `--dtype`)."""
    p.add_argument("--device", default="auto", type=str, help=DEVICE_HELP)
    if dtype:
        p.add_argument("--dtype", default="auto", type=_dtype_arg, metavar="{auto,float32,bfloat16,float16}",
                       help=DTYPE_HELP)
        p.add_argument("--precision", dest="dtype", type=_dtype_arg, help=argparse.SUPPRESS)
