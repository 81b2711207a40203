"""Gate checkpoints: loraflow's format (safetensors + JSON) and the original release's `.pt`.

A loraflow gate is two files:
- `gate.safetensors`: only the gate tensors, `layers.{i}.weight` (k, hidden) and `layers.{i}.bias` (k,), fp32;
- `gate.json`: k, LoRA names and order, hidden size, number of layers, temperature, base model id, LoRA ids and
  the loraflow version.
`path` is either a folder holding both, or `X.safetensors` with `X.json` beside it. A `.pt`/`.bin` path is an
original gate (`encoder.layers.{i}.lora_fusion_gate.weight`, `encoder.layers.{i}.weight_bias`), loaded with
`weights_only=True` and converted by the tables in `convert.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loraflow import __version__
from loraflow.convert.tables import gate_original_to_loraflow, gate_shape
from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_json, load_tensors, read_json, save_tensors

GATE_FORMAT = "loraflow-gate"
ORIGINAL_SUFFIXES = (".pt", ".bin", ".pth")


def gate_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(tensor file, JSON file or None for an original gate) for a gate path."""
    path = Path(path)
    if path.suffix in ORIGINAL_SUFFIXES:
        return path, None
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "gate.safetensors", path / "gate.json"


def gate_state_dict(flow_model) -> dict[str, torch.Tensor]:
    """The gate tensors of a FlowModel in loraflow's key names (fp32, CPU)."""
    out = {}
    for i, gate in enumerate(flow_model.gates()):
        out[f"layers.{i}.weight"] = gate.weight.detach().float().cpu()
        out[f"layers.{i}.bias"] = gate.bias.detach().float().cpu()
    return out


def gate_config(flow_model, **metadata) -> dict:
    return {
        "format": GATE_FORMAT,
        "k": flow_model.k,
        "lora_names": list(flow_model.lora_names),
        "lora_ids": [str(x) for x in flow_model.lora_ids],
        "hidden_size": flow_model.hidden_size,
        "num_layers": flow_model.num_layers,
        "temperature": flow_model.temperature,
        "base_model": flow_model.base_name_or_path,
        "loraflow_version": __version__,
        **metadata,
    }


def write_gate(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> tuple[Path, Path]:
    """Write a loraflow gate (tensor file first, then its JSON; each atomically)."""
    num_layers, k, hidden = gate_shape(tensors)
    if (config.get("num_layers"), config.get("k"), config.get("hidden_size")) != (num_layers, k, hidden):
        raise LoraflowError(f"gate config says layers/k/hidden = {config.get('num_layers')}/{config.get('k')}/"
                            f"{config.get('hidden_size')} but the tensors are {num_layers}/{k}/{hidden}")
    tensor_path, json_path = gate_files(path)
    if json_path is None:
        raise LoraflowError(f"{path}: a loraflow gate is a folder or a .safetensors file; use `loraflow convert "
                            "gate --to original` to write the original .pt format")
    save_tensors(tensor_path, tensors, metadata={"format": GATE_FORMAT})
    atomic_write_json(json_path, config)
    return tensor_path, json_path


def save_gate(flow_model, path: str | os.PathLike, **metadata) -> tuple[Path, Path]:
    return write_gate(path, gate_state_dict(flow_model), gate_config(flow_model, **metadata))


def read_gate(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(loraflow-format tensors, config or None) from a loraflow gate or an original `.pt`."""
    tensor_path, json_path = gate_files(path)
    if not tensor_path.is_file():
        raise LoraflowError(f"{path}: no gate found (looked for {tensor_path})")
    tensors = load_tensors(tensor_path)
    if json_path is None:
        return gate_original_to_loraflow(tensors), None
    if not json_path.is_file():
        raise LoraflowError(f"{tensor_path}: its config {json_path.name} is missing beside it")
    config = read_json(json_path)
    if config.get("format") != GATE_FORMAT:
        raise LoraflowError(f"{json_path}: not a loraflow gate config (format={config.get('format')!r})")
    gate_shape(tensors)  # validates keys and shapes
    return {k: v.float() for k, v in tensors.items()}, config


def load_gate_into(flow_model, path: str | os.PathLike, check_lora_names: bool = True) -> dict | None:
    """Copy a gate into `flow_model`'s gates; refuses any mismatch, naming it. Returns the gate's config."""
    tensors, config = read_gate(path)
    num_layers, k, hidden = gate_shape(tensors)
    expected = {"layers": flow_model.num_layers, "k (number of LoRAs)": flow_model.k,
                "hidden size": flow_model.hidden_size}
    for (what, want), got in zip(expected.items(), (num_layers, k, hidden)):
        if want != got:
            raise LoraflowError(f"gate {path}: {what} is {got}, but the model has {want} "
                                f"(LoRAs {flow_model.lora_names}); this gate was trained for another setup")
    if config is not None and check_lora_names:
        names = list(config.get("lora_names") or [])
        if names and names != list(flow_model.lora_names):
            why = "the same LoRAs in another order" if sorted(names) == sorted(flow_model.lora_names) else \
                "other LoRAs"
            raise LoraflowError(
                f"gate {path}: trained on LoRAs {names}, but the model has {list(flow_model.lora_names)} ({why}). "
                "Pass the LoRAs in the gate's order, or check_lora_names=False if only the names differ."
            )
    with torch.no_grad():
        for i, gate in enumerate(flow_model.gates()):
            gate.weight.copy_(tensors[f"layers.{i}.weight"])
            gate.bias.copy_(tensors[f"layers.{i}.bias"])
    if config is not None and "temperature" in config:
        flow_model.set_temperature(float(config["temperature"]))
    return config
