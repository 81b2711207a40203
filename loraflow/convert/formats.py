"""The conversions behind `loraflow convert` (see `loraflow.convert.cli` for the command and formats):
LoRAs, base models and gates between loraflow / Hugging Face and the original (BMTrain/ModelCenter) formats.

Every conversion is exact (no dtype change unless asked), checks every key and shape, reads sharded inputs a
shard (safetensors: a tensor) at a time, and writes into OUT.tmp-xxxx/ first: a failed conversion leaves nothing,
an identical existing OUT is left alone, a different one is replaced only with force=True.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch

from loraflow import __version__
from loraflow.convert import tables as C
from loraflow.convert.shards import ShardWriter, TensorSource, parse_size, save_pickle, staged_output
from loraflow.devices import DTYPES as DTYPE_NAMES
from loraflow.errors import LoraflowError
from loraflow.eval.registry import default_temperature, release_gate_metadata
from loraflow.files import atomic_write_json, load_tensors, read_json, save_tensors

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
BMTRAIN_WEIGHTS = ("lora.pt", "lora.bin", "lora.safetensors")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MC_WEIGHTS = ("pytorch_model.pt", "model.safetensors")
# Tokenizer and generation files a model folder carries along unchanged (the original copied the tokenizer too).
AUX_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names every --dtype uses


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _report(out: Path, status: str) -> str:
    _say({"unchanged": f"{out}: already there and identical; left as is",
          "replaced": f"{out}: replaced (--force)", "written": f"{out}: written"}[status])
    return status


def config_from(path: str | Path | None, what: str) -> dict | None:
    """A config.json given as the file or the folder holding it."""
    if path is None:
        return None
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise LoraflowError(f"{what}: {path} not found (give a config.json or the folder holding it)")
    return read_json(path)


# ----------------------------------------------------------------------------------------------- LoRA
def convert_lora(src, out, to: str, *, base_config: dict | None = None, adapter_name: str | None = None,
                 lora_alpha: float | None = None, lora_dropout: float | None = None,
                 base_model: str | None = None, force: bool = False) -> str:
    """PEFT adapter folder <-> BMTrain LoRA folder (`lora.pt` + `lora_config.json`). Returns the publish status."""
    src, out = Path(src), Path(out)
    if to == "bmtrain":
        peft_config = read_json((src if src.is_dir() else src.parent) / "adapter_config.json")
        state = TensorSource(src, PEFT_WEIGHTS).load_all()
        summary = C.check_peft_lora(state, peft_config, base_config, adapter_name)
        tensors = C.lora_peft_to_bmtrain(state, peft_config, base_config, adapter_name)
        sidecar = C.lora_config_peft_to_bmtrain(peft_config, summary["num_layers"])
        with staged_output(out, force) as stage:
            save_pickle(stage.path / "lora.pt", tensors)
            atomic_write_json(stage.path / "lora_config.json", sidecar)
        return _report(out, stage.status)
    if to != "peft":
        raise LoraflowError(f"convert lora: --to must be bmtrain or peft, not {to!r}")
    folder = src if src.is_dir() else src.parent
    sidecar = read_json(folder / "lora_config.json") if (folder / "lora_config.json").is_file() else None
    state = TensorSource(src, BMTRAIN_WEIGHTS).load_all()
    tensors = C.lora_bmtrain_to_peft(state, sidecar, base_config)
    if sidecar is None:  # e.g. the original's BM_LoRAs: rank and targets from the tensors, alpha from the user
        if lora_alpha is None:
            raise LoraflowError(f"{folder}: no lora_config.json beside the BMTrain LoRA, so lora_alpha is unknown; "
                                "pass --lora-alpha (the released LoRAs use 16)")
        ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1:
            raise LoraflowError(f"{src}: LoRA ranks differ between modules {sorted(ranks)}; "
                                "write a lora_config.json with r and rank_pattern")
        sidecar = {"r": ranks.pop(), "lora_alpha": lora_alpha, "lora_dropout": lora_dropout or 0.0,
                   "target_modules": C.check_peft_lora(tensors, None, base_config)["target_modules"]}
    adapter_config = C.lora_config_bmtrain_to_peft(sidecar)
    if base_model is not None:
        adapter_config["base_model_name_or_path"] = base_model
    with staged_output(out, force) as stage:
        save_tensors(stage.path / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(stage.path / "adapter_config.json", adapter_config)
    return _report(out, stage.status)


# ----------------------------------------------------------------------------------------------- base model
def convert_base(src, out, to: str, *, reference_config: dict | None = None, max_shard_size=None,
                 dtype: torch.dtype | None = None, force: bool = False) -> str:
    """Hugging Face Llama folder <-> ModelCenter Llama folder, shard by shard. Returns the publish status.

    ModelCenter output: config.json (ModelCenter fields), hf_config.json (the HF config, for the way back),
    pytorch_model.pt (or shards + index when --max-shard-size is given) and the tokenizer files.
    Hugging Face output: config.json, model.safetensors (5GB shards + index by default), tokenizer files.
    """
    src, out = Path(src), Path(out)
    config = config_from(src, f"convert base --to {to}")
    if to == "modelcenter":
        if "dim_model" in config:
            raise LoraflowError(f"{src}/config.json is a ModelCenter config; did you mean --to hf?")
        new_config = C.base_config_hf_to_modelcenter(config)
        plan_fn, weights, out_name = C.base_plan_hf_to_modelcenter, HF_WEIGHTS, "pytorch_model.pt"
        extra = {"hf_config.json": config}
    elif to == "hf":
        if "dim_model" not in config:
            raise LoraflowError(f"{src}/config.json is not a ModelCenter config (no dim_model); did you mean "
                                "--to modelcenter?")
        if reference_config is None and (src / "hf_config.json").is_file():
            reference_config = read_json(src / "hf_config.json")
        new_config = C.base_config_modelcenter_to_hf(config, reference_config)
        plan_fn, weights, out_name = C.base_plan_modelcenter_to_hf, MC_WEIGHTS, "model.safetensors"
        max_shard_size = "5GB" if max_shard_size is None else max_shard_size
        extra = {}
    else:
        raise LoraflowError(f"convert base: --to must be modelcenter or hf, not {to!r}")
    source = TensorSource(src, weights)
    shapes = source.shapes()
    plan = plan_fn(shapes, config)  # every name (and every shape a header gives) before writing anything
    first_dtype = None
    with staged_output(out, force) as stage:
        writer = ShardWriter(stage.path, out_name, parse_size(max_shard_size))
        for _, pairs in source.iter_shards():
            for key, tensor in pairs:
                if shapes.get(key) is None:  # an indexed pickle shard: its shapes are known only now
                    plan_fn({key: tuple(tensor.shape)}, config, partial=True)
                dst = plan[key][0]
                if dst is None:
                    continue
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                first_dtype = first_dtype or tensor.dtype
                writer.add(dst, tensor)
        writer.close()
        if to == "hf":
            new_config["dtype"] = str(first_dtype).removeprefix("torch.")
            new_config.pop("torch_dtype", None)
        atomic_write_json(stage.path / "config.json", new_config)
        for name, obj in extra.items():
            atomic_write_json(stage.path / name, obj)
        for name in AUX_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, stage.path / name)
    return _report(out, stage.status)


# ----------------------------------------------------------------------------------------------- gates
def loraflow_gate_paths(path) -> tuple[Path, Path]:
    """(tensors, json) of a loraflow gate: a folder (gate.safetensors + gate.json) or X.safetensors + X.json."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "gate.safetensors", path / "gate.json"


def convert_gate(src, out, to: str, *, lora_names=None, temperature: float | None = None,
                 base_model: str | None = None, lora_ids=None, base_config: dict | None = None,
                 dtype: torch.dtype = torch.float16, force: bool = False) -> str:
    """Original gate `.pt` <-> loraflow gate (safetensors + JSON). Returns the publish status.

    Without `lora_names`/`temperature`, a released gate's file name (`zh_math.pt`) gives them (language LoRA
    first; T = 1.1 for zh_math and ru_math, as the original ran them); other names get lora_0..lora_{k-1}, T = 1.
    """
    src, out = Path(src), Path(out)
    if to == "loraflow":
        tensors = C.gate_original_to_loraflow(load_tensors(src))
        num_layers, k, hidden = C.gate_shape(tensors)
        if base_config is not None:
            dims = C.hf_dims(base_config)
            if (num_layers, hidden) != (dims["layers"], dims["h"]):
                raise LoraflowError(f"{src}: gate has {num_layers} layers x hidden {hidden}, the base model "
                                    f"{dims['layers']} x {dims['h']}")
        known = release_gate_metadata(src.stem)
        lora_names = list(lora_names or known.get("lora_names") or [f"lora_{i}" for i in range(k)])
        if len(lora_names) != k or (lora_ids is not None and len(lora_ids) != k):
            raise LoraflowError(f"{src}: the gate fuses k={k} LoRAs; got lora names {lora_names}, ids {lora_ids}")
        meta = {"format": "loraflow-gate", "k": k, "lora_names": lora_names, "hidden_size": hidden,
                "num_layers": num_layers,
                "temperature": temperature if temperature is not None else
                default_temperature(known["language"], known["task"]) if known else 1.0,
                "base_model": base_model, "lora_ids": list(lora_ids) if lora_ids else None,
                "loraflow_version": __version__, "source": src.name,
                "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
        tensor_path, json_path = loraflow_gate_paths(out)
        files = None if tensor_path.parent == out else [tensor_path.name, json_path.name]
        with staged_output(out, force, files) as stage:
            save_tensors(stage.path / tensor_path.name, tensors, metadata={"format": "pt"})
            atomic_write_json(stage.path / json_path.name, meta)
        return _report(out, stage.status)
    if to != "original":
        raise LoraflowError(f"convert gate: --to must be loraflow or original, not {to!r}")
    tensor_path, json_path = loraflow_gate_paths(src)
    tensors = load_tensors(tensor_path)
    shape = C.gate_shape(tensors)
    if json_path.is_file():
        meta = read_json(json_path)
        if (meta.get("num_layers"), meta.get("k"), meta.get("hidden_size")) != shape:
            raise LoraflowError(f"{json_path}: says num_layers/k/hidden_size = {meta.get('num_layers')}/"
                                f"{meta.get('k')}/{meta.get('hidden_size')}, the tensors have {shape}")
    with staged_output(out, force, [out.name]) as stage:
        save_pickle(stage.path / out.name, C.gate_loraflow_to_original(tensors, dtype))
    return _report(out, stage.status)
