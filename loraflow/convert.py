"""Pure state-dict -> state-dict converters between loraflow and the original LoRA-Flow (BMTrain/ModelCenter) formats.

Every converter is driven by a mapping table, takes sizes from the tensors or configs it is given (never hard-coded
layer counts or widths), and is strict: an unknown key, a missing layer or a wrong shape is a `LoraflowError` that
names the key. Nothing here touches files; `checkpoints.py` and the CLI do the I/O.
"""

from __future__ import annotations

import re

import torch

from .errors import LoraflowError

# ---------------------------------------------------------------------------------------------------------------
# Gates. Original release (SPEC §5), per decoder layer i:
#   encoder.layers.{i}.lora_fusion_gate.weight  (k, hidden)  fp16
#   encoder.layers.{i}.weight_bias              (1, k)       fp16
# loraflow gate file (gate.safetensors), per decoder layer i:
#   layers.{i}.weight  (k, hidden)  fp32
#   layers.{i}.bias    (k,)         fp32
# ---------------------------------------------------------------------------------------------------------------
ORIGINAL_GATE_PATTERNS = {
    "weight": re.compile(r"^encoder\.layers\.(\d+)\.lora_fusion_gate\.weight$"),
    "bias": re.compile(r"^encoder\.layers\.(\d+)\.weight_bias$"),
}
LORAFLOW_GATE_PATTERNS = {
    "weight": re.compile(r"^layers\.(\d+)\.weight$"),
    "bias": re.compile(r"^layers\.(\d+)\.bias$"),
}


def _split_by_layer(state_dict: dict[str, torch.Tensor], patterns: dict[str, re.Pattern], what: str):
    """Group `state_dict` into {layer: {role: tensor}} by `patterns`; refuse unknown keys and gaps in the layers."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        for role, pattern in patterns.items():
            m = pattern.match(key)
            if m:
                layers.setdefault(int(m.group(1)), {})[role] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoraflowError(f"{what}: unknown keys {sorted(unknown)[:8]}{' ...' if len(unknown) > 8 else ''}")
    if not layers:
        raise LoraflowError(f"{what}: no gate tensors found")
    n = max(layers) + 1
    missing = [f"layer {i} {role}" for i in range(n) for role in patterns if role not in layers.get(i, {})]
    if missing:
        raise LoraflowError(f"{what}: missing {missing[:8]}{' ...' if len(missing) > 8 else ''} (layers 0..{n - 1})")
    return [layers[i] for i in range(n)]


def _check_gate_layer(i: int, weight: torch.Tensor, bias: torch.Tensor, k: int, hidden: int, what: str) -> None:
    if weight.dim() != 2 or tuple(weight.shape) != (k, hidden):
        raise LoraflowError(f"{what}: layer {i} gate weight has shape {tuple(weight.shape)}, expected ({k}, {hidden})")
    if bias.numel() != k:
        raise LoraflowError(f"{what}: layer {i} gate bias has shape {tuple(bias.shape)}, expected {k} values")


def gate_original_to_loraflow(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original released gate (`encoder.layers.{i}.lora_fusion_gate.weight`, `...weight_bias`) -> loraflow gate."""
    layers = _split_by_layer(state_dict, ORIGINAL_GATE_PATTERNS, "original gate")
    k, hidden = layers[0]["weight"].shape
    out = {}
    for i, t in enumerate(layers):
        _check_gate_layer(i, t["weight"], t["bias"], k, hidden, "original gate")
        if t["bias"].shape not in ((1, k), (k,)):
            raise LoraflowError(f"original gate: layer {i} weight_bias has shape {tuple(t['bias'].shape)}, "
                                f"expected (1, {k})")
        out[f"layers.{i}.weight"] = t["weight"].float().clone()
        out[f"layers.{i}.bias"] = t["bias"].reshape(k).float().clone()
    return out


def gate_loraflow_to_original(state_dict: dict[str, torch.Tensor], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """loraflow gate -> the original release's key names, shapes and dtype (fp16 by default)."""
    layers = _split_by_layer(state_dict, LORAFLOW_GATE_PATTERNS, "loraflow gate")
    k, hidden = layers[0]["weight"].shape
    out = {}
    for i, t in enumerate(layers):
        _check_gate_layer(i, t["weight"], t["bias"], k, hidden, "loraflow gate")
        out[f"encoder.layers.{i}.lora_fusion_gate.weight"] = t["weight"].to(dtype).clone()
        out[f"encoder.layers.{i}.weight_bias"] = t["bias"].reshape(1, k).to(dtype).clone()
    return out


def gate_shape(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(num_layers, k, hidden) of a loraflow-format gate state dict (validated)."""
    layers = _split_by_layer(state_dict, LORAFLOW_GATE_PATTERNS, "loraflow gate")
    k, hidden = layers[0]["weight"].shape
    for i, t in enumerate(layers):
        _check_gate_layer(i, t["weight"], t["bias"], k, hidden, "loraflow gate")
    return len(layers), k, hidden
