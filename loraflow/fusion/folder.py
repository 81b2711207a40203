"""`loraflow export`: one self-contained LoRA-Flow model folder, loadable by `FlowModel.from_pretrained(OUT)` and
by loraflow's vLLM plugin (`loraflow serve OUT`, `vllm serve OUT`).

  loraflow export outputs/zh_math --base-model meta-llama/Llama-2-7b-hf \\
      --loras checkpoints/LoRAs/zh_lora checkpoints/LoRAs/math_lora --gate checkpoints/Gates/zh_math.pt \\
      --temperature 1.1

The folder:
- `config.json`: the base's config with `architectures` = loraflow's name for the base's (LoraFlowLlamaForCausalLM,
  ...) and a `loraflow` block: format version, base architecture, mode, static weights, gate temperature, k and
  per LoRA (in fusion order) its name, source, folder, targets, and rank and scaling per targeted projection;
- the base's weights (`*.safetensors`, index included) as hard links (`--weights link`, the default; copies where
  the file system cannot link) or copies (`--weights copy`), and `generation_config.json` when the base has one;
- the tokenizer (its own `save_pretrained` files);
- `loraflow/loras/{name}/`: each LoRA as a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`);
- `loraflow/gate.safetensors` + `loraflow/gate.json`: the gate in loraflow's format (fp32), flow mode only.
The loraflow tensors sit in a subfolder so that neither transformers nor vLLM take them for base weights.

Refused, each with a named error: a base that is not a Llama, Mistral or Qwen2 causal LM; a quantized base; base
weights that are not safetensors; LoRAs whose targets or ranks differ between decoder layers (an engine builds
one layer shape for all layers); flow mode without a gate; static weights that are not k numbers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraflow import __version__
from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_json, read_json

FORMAT = "loraflow-model"
FORMAT_VERSION = 1
MODES = ("flow", "static", "single", "base")
# base architecture -> loraflow's (vLLM's registry and the config's `architectures` use these names)
ARCHITECTURES = {
    "LlamaForCausalLM": "LoraFlowLlamaForCausalLM",
    "MistralForCausalLM": "LoraFlowMistralForCausalLM",
    "Qwen2ForCausalLM": "LoraFlowQwen2ForCausalLM",
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DIR = "loraflow/loras"
GATE_DIR = "loraflow"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


@dataclass
class FolderSpec:
    """What `FlowModel.from_pretrained` needs to rebuild a folder's model (paths are inside the folder)."""

    base: Path
    loras: list[Path]
    lora_names: list[str]
    gate: Path | None
    mode: str
    static_weights: list[float] | None
    lora: int | None
    temperature: float


def is_model_folder(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    block = read_json(config).get("loraflow")
    return isinstance(block, dict) and block.get("format") == FORMAT


def read_block(path: str | os.PathLike) -> dict:
    """The `loraflow` block of a model folder's config.json, checked."""
    config_path = Path(path) / "config.json"
    block = read_json(config_path).get("loraflow")
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise LoraflowError(f"{config_path}: not a LoRA-Flow model folder (no `loraflow` block with format "
                            f"{FORMAT!r}); write one with `loraflow export`")
    if block.get("format_version") != FORMAT_VERSION:
        raise LoraflowError(f"{config_path}: loraflow.format_version is {block.get('format_version')!r}; this "
                            f"loraflow reads version {FORMAT_VERSION}")
    if block.get("mode") not in MODES:
        raise LoraflowError(f"{config_path}: loraflow.mode is {block.get('mode')!r}; one of {MODES}")
    if len(block.get("loras") or []) != block.get("k"):
        raise LoraflowError(f"{config_path}: loraflow.k is {block.get('k')!r} but {len(block.get('loras') or [])} "
                            "LoRAs are listed")
    return block


def folder_spec(path: str | os.PathLike) -> FolderSpec:
    path = Path(path)
    block = read_block(path)
    gate = path / GATE_DIR if block["mode"] == "flow" else None
    return FolderSpec(base=path, loras=[path / lora["path"] for lora in block["loras"]],
                      lora_names=[lora["name"] for lora in block["loras"]], gate=gate, mode=block["mode"],
                      static_weights=block.get("static_weights"), lora=block.get("lora"),
                      temperature=float(block.get("temperature", 1.0)))


def projection_layout(adapter, num_layers: int, layer_prefix: str) -> tuple[dict[str, int], dict[str, float]]:
    """(rank, scaling) per targeted projection name; refuses a LoRA whose layers differ."""
    per_layer: list[dict[str, tuple[int, float]]] = [{} for _ in range(num_layers)]
    for module in adapter.weights:
        rest = module[len(layer_prefix):] if module.startswith(layer_prefix) else None
        parts = rest.split(".") if rest else []
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in PROJECTIONS:
            raise LoraflowError(f"LoRA {adapter.name}: {module} is not one of the seven projections "
                                f"{PROJECTIONS} of a decoder layer; a model folder can only hold those")
        per_layer[int(parts[0])][parts[2]] = (adapter.rank(module), adapter.scaling(module))
    first = per_layer[0]
    for i, layer in enumerate(per_layer):
        if layer != first:
            raise LoraflowError(
                f"LoRA {adapter.name}: decoder layer {i} has targets/ranks/scalings {layer}, layer 0 has {first}; "
                "a model folder needs the same LoRA layout in every layer")
    ordered = [p for p in PROJECTIONS if p in first]
    return {p: first[p][0] for p in ordered}, {p: first[p][1] for p in ordered}


def _base_folder(base: str) -> Path:
    path = Path(base)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja"]))
    except Exception as e:  # offline cache miss, 404, auth: the hub's message says which
        raise LoraflowError(f"base model {base!r}: not a local folder and not fetched from the hub ({e})") from None


def _place(src: Path, dst: Path, weights: str) -> None:
    if weights == "link":
        try:
            os.link(src.resolve(), dst)
            return
        except OSError:  # another file system, or one without hard links: fall back to a copy
            pass
    shutil.copyfile(src, dst)


def export_model_folder(out: str | os.PathLike, base_model: str, loras: Sequence[str],
                        gate: str | os.PathLike | None = None, mode: str = "flow",
                        static_weights: Sequence[float] | None = None, lora: int | str | None = None,
                        temperature: float | None = None, lora_names: Sequence[str] | None = None,
                        tokenizer: str | None = None, weights: str = "link", overwrite: bool = False) -> Path:
    """Write a LoRA-Flow model folder (see the module docstring); the folder appears whole or not at all."""
    from transformers import AutoConfig, AutoTokenizer

    from loraflow.convert.tables import gate_shape
    from loraflow.fusion.adapters import load_adapter
    from loraflow.fusion.checkpoints import read_gate, write_gate

    out = Path(out)
    if mode not in MODES:
        raise LoraflowError(f"--mode {mode!r}: choose one of {MODES}")
    if weights not in ("link", "copy"):
        raise LoraflowError(f"--weights {weights!r}: choose link or copy")
    if out.exists() and not overwrite:
        raise LoraflowError(f"{out}: already exists; remove it or pass --overwrite")
    if not loras:
        raise LoraflowError("--loras: a model folder needs at least one LoRA")
    base_dir = _base_folder(base_model)
    config = AutoConfig.from_pretrained(base_dir)
    base_arch = (getattr(config, "architectures", None) or [None])[0]
    if base_arch not in ARCHITECTURES:
        raise LoraflowError(f"{base_dir / 'config.json'}: architectures is {config.architectures}; a LoRA-Flow model "
                            f"folder supports {sorted(ARCHITECTURES)}")
    if getattr(config, "quantization_config", None):
        raise LoraflowError(f"{base_dir / 'config.json'}: the base is quantized (quantization_config); export a "
                            "full-precision base")
    weight_files = sorted(base_dir.glob("*.safetensors"))
    if not weight_files:
        raise LoraflowError(f"{base_dir}: no *.safetensors weights; save the base with "
                            "`save_pretrained(..., safe_serialization=True)` first")

    adapters = [load_adapter(src, name=lora_names[i] if lora_names else None) for i, src in enumerate(loras)]
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise LoraflowError(f"LoRA names must be unique, got {names}; pass --lora-names")
    k = len(adapters)
    layers = config.num_hidden_layers
    layouts = [projection_layout(a, layers, "model.layers.") for a in adapters]

    lora_index = None
    if mode == "static":
        if static_weights is None or len(static_weights) != k:
            raise LoraflowError(f"--static-weights: static mode needs {k} numbers (one per LoRA {names}), got "
                                f"{None if static_weights is None else list(static_weights)}")
        static_weights = [float(w) for w in static_weights]
    elif static_weights is not None:
        raise LoraflowError(f"--static-weights is for --mode static, not {mode}")
    if mode == "single":
        choice = 0 if lora is None else lora
        if isinstance(choice, str) and not choice.lstrip("-").isdigit():
            if choice not in names:
                raise LoraflowError(f"--lora {choice!r}: no LoRA of that name; LoRAs: {names}")
            lora_index = names.index(choice)
        else:
            lora_index = int(choice)
            if not -k <= lora_index < k:
                raise LoraflowError(f"--lora {choice}: out of range for {k} LoRAs")
            lora_index %= k
    gate_tensors = gate_config = None
    if mode == "flow":
        if gate is None:
            raise LoraflowError("--mode flow needs --gate (a loraflow gate or an original .pt)")
        gate_tensors, gate_config = read_gate(gate)
        got = gate_shape(gate_tensors)
        if got != (layers, k, config.hidden_size):
            raise LoraflowError(f"gate {gate}: layers/k/hidden are {got}, the base and LoRAs need "
                                f"{(layers, k, config.hidden_size)}")
        if gate_config and gate_config.get("lora_names") and list(gate_config["lora_names"]) != names:
            raise LoraflowError(f"gate {gate}: trained on LoRAs {gate_config['lora_names']}, the folder gets "
                                f"{names}; pass the LoRAs in the gate's order (or --lora-names)")
        if temperature is None:
            temperature = float((gate_config or {}).get("temperature", 1.0))
    elif gate is not None:
        raise LoraflowError(f"--gate is for --mode flow, not {mode}")
    temperature = 1.0 if temperature is None else float(temperature)
    if not temperature > 0:
        raise LoraflowError(f"--temperature must be > 0, got {temperature}")

    block = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "loraflow_version": __version__,
        "base_architecture": base_arch, "base_model": str(base_model), "mode": mode,
        "static_weights": static_weights, "lora": lora_index, "temperature": temperature, "k": k,
        "loras": [{"name": a.name, "source": a.source, "path": f"{LORA_DIR}/{a.name}", "targets": list(ranks),
                   "ranks": ranks, "scalings": scalings, "lora_dropout": a.dropout}
                  for a, (ranks, scalings) in zip(adapters, layouts)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for src in weight_files:
            _place(src, tmp / src.name, weights)
        for extra in ("model.safetensors.index.json", "generation_config.json"):
            if (base_dir / extra).is_file():
                shutil.copyfile(base_dir / extra, tmp / extra)
        tok_src = Path(tokenizer) if tokenizer else base_dir
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
        for adapter in adapters:
            _save_adapter(adapter, tmp / LORA_DIR / adapter.name)
        if gate_tensors is not None:
            meta = {"format": "loraflow-gate", "k": k, "lora_names": names, "lora_ids": [a.source for a in adapters],
                    "hidden_size": config.hidden_size, "num_layers": layers, "temperature": temperature,
                    "base_model": str(base_model), "loraflow_version": __version__, "source": str(gate)}
            write_gate(tmp / GATE_DIR, gate_tensors, meta)
        config_dict = read_json(base_dir / "config.json")
        config_dict["architectures"] = [ARCHITECTURES[base_arch]]
        config_dict["loraflow"] = block
        atomic_write_json(tmp / "config.json", config_dict)
        if out.exists():  # --overwrite: the old folder goes only once the new one is complete
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _save_adapter(adapter, folder: Path) -> None:
    """A LoRA as a PEFT folder: its own adapter_config.json and the tensors in PEFT's saved key names."""
    from loraflow.files import save_tensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in adapter.weights.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_tensors(folder / "adapter_model.safetensors", tensors)
    atomic_write_json(folder / "adapter_config.json", adapter.config)


# --------------------------------------------------------------------------------------------------------- CLI
