"""Convert LoRAs, base models and gates between loraflow / Hugging Face formats and the original LoRA-Flow
(BMTrain/ModelCenter) formats.

  loraflow convert lora --to bmtrain IN OUT     PEFT adapter folder -> OUT/lora.pt + OUT/lora_config.json
  loraflow convert lora --to peft IN OUT        BMTrain LoRA (folder with lora.pt, or the .pt) -> PEFT adapter folder
  loraflow convert base --to modelcenter IN OUT Hugging Face Llama folder -> ModelCenter folder
  loraflow convert base --to hf IN OUT          ModelCenter Llama folder -> Hugging Face folder
  loraflow convert base --from gguf FILE OUT    GGUF file (llama.cpp) -> Hugging Face folder, dequantized
  loraflow convert gate --to loraflow IN OUT    original gate .pt -> OUT/gate.safetensors + gate.json (or X.safetensors)
  loraflow convert gate --to original IN OUT    loraflow gate -> original gate .pt (fp16)

Every conversion is exact (no dtype change unless --dtype), checks every key and shape, reads sharded inputs a
shard (safetensors: a tensor) at a time, and writes into OUT.tmp-xxxx/ first: a failed conversion leaves nothing,
an identical existing OUT is left alone, a different one is replaced only with --force.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import torch

from . import __version__
from . import convert as C
from .errors import LoraflowError
from .files import atomic_write_json, load_tensors, read_json, save_tensors
from .release import release_gate_metadata
from .shards import ShardWriter, TensorSource, parse_size, save_pickle, staged_output

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
BMTRAIN_WEIGHTS = ("lora.pt", "lora.bin", "lora.safetensors")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MC_WEIGHTS = ("pytorch_model.pt", "model.safetensors")
# Tokenizer and generation files a model folder carries along unchanged (the original copied the tokenizer too).
AUX_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _report(out: Path, status: str) -> str:
    _say({"unchanged": f"{out}: already there and identical; left as is",
          "replaced": f"{out}: replaced (--force)", "written": f"{out}: written"}[status])
    return status


def _config_from(path: str | Path | None, what: str) -> dict | None:
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
    config = _config_from(src, f"convert base --to {to}")
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
                "temperature": temperature if temperature is not None else known.get("temperature", 1.0),
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


# ----------------------------------------------------------------------------------------------- CLI
DESCRIPTIONS = {
    "lora": """PEFT LoRA adapter <-> BMTrain/ModelCenter LoRA (the original LoRA-Flow training format).

--to bmtrain: IN is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin; old or current
  key style). OUT/lora.pt holds encoder.layers.{l}...._lora.lora_{A,B}.weight; OUT/lora_config.json holds r,
  lora_alpha, lora_dropout, target modules and the full adapter_config.json for the way back.
--to peft: IN is a folder with lora.pt (+ lora_config.json), or the .pt itself. OUT is a PEFT adapter folder
  (adapter_model.safetensors, standard saved key names, + adapter_config.json) that PeftModel.from_pretrained loads.
  Without lora_config.json the rank and targets come from the tensors and --lora-alpha is required.""",
    "base": """Hugging Face Llama base model <-> ModelCenter Llama base model, shard by shard.

--to modelcenter: IN is a Hugging Face folder (config.json + model.safetensors, pytorch_model.bin, or their shards
  with an index). OUT gets config.json (dim_model, dim_ff, num_layers, num_heads, num_heads_kv, dim_head, norm_eps,
  vocab_size, tied), hf_config.json (the source config, for the way back), pytorch_model.pt and the tokenizer files.
--to hf: IN is a ModelCenter folder (config.json + pytorch_model.pt). OUT is a Hugging Face folder that
  AutoModelForCausalLM.from_pretrained loads (model.safetensors, sharded above --max-shard-size).
--from gguf: IN is a GGUF file (any quantization transformers reads, with `pip install gguf`). OUT is a Hugging Face
  folder: config.json, model.safetensors (dequantized: fp32, or --dtype), the tokenizer and chat template from the
  file's metadata, and gguf_source.json (the GGUF's name and sha256).
Tied embeddings: with tie_word_embeddings / tied, no lm_head / output_projection is written, and one found in the
checkpoint is an error (the config and the weights disagree).""",
    "gate": """Original LoRA-Flow gate (.pt: encoder.layers.{i}.lora_fusion_gate.weight (k, hidden) and
encoder.layers.{i}.weight_bias (1, k), fp16) <-> loraflow gate (gate.safetensors: layers.{i}.weight / .bias fp32,
+ gate.json).

--to loraflow: OUT is a folder (gate.safetensors + gate.json) or X.safetensors (+ X.json beside it). A released
  gate's file name (zh_math.pt) gives the LoRA names ([zh_lora, math_lora]: language first) and the temperature the
  original used (1.1 for zh_math and ru_math, else 1.0); override with --lora-names / --temperature.
--to original: IN is a loraflow gate; OUT is a .pt file in the released layout (fp16 unless --dtype).""",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="{lora,base,gate}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--force", action="store_true", help="replace an existing, different OUT")

    lora = sub.add_parser("lora", parents=[common], help="PEFT <-> BMTrain/ModelCenter LoRA",
                          description=DESCRIPTIONS["lora"],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    lora.add_argument("--to", required=True, choices=["bmtrain", "peft"])
    lora.add_argument("src", metavar="IN", help="PEFT adapter folder, or BMTrain LoRA folder (lora.pt) / .pt file")
    lora.add_argument("out", metavar="OUT", help="output folder")
    lora.add_argument("--base-config", help="base model config.json (or its folder): also check in/out sizes and "
                                            "the layer count against it")
    lora.add_argument("--adapter", dest="adapter_name",
                      help="the adapter to take when a PEFT state dict holds several")
    lora.add_argument("--lora-alpha", type=float, help="--to peft without lora_config.json: the LoRA alpha")
    lora.add_argument("--lora-dropout", type=float, help="--to peft without lora_config.json: the dropout (0)")
    lora.add_argument("--base-model", help="--to peft: base_model_name_or_path to record in adapter_config.json")

    base = sub.add_parser("base", parents=[common], help="Hugging Face <-> ModelCenter Llama base model; GGUF -> HF",
                          description=DESCRIPTIONS["base"],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    base.add_argument("--to", choices=["modelcenter", "hf"], help="the output format (--from gguf: hf)")
    base.add_argument("--from", dest="from_format", choices=["gguf"], help="IN is a GGUF file (output: hf)")
    base.add_argument("src", metavar="IN", help="model folder (config.json + weights, sharded or not), or a GGUF "
                                                "file with --from gguf")
    base.add_argument("out", metavar="OUT", help="output folder")
    base.add_argument("--max-shard-size", help="split the output into shards of this size, e.g. 5GB (default: --to "
                                               "hf 5GB; --to modelcenter one pytorch_model.pt, as ModelCenter expects)")
    base.add_argument("--dtype", choices=list(DTYPES), help="cast floating tensors (default: keep them exactly)")
    base.add_argument("--hf-config", help="--to hf: a reference HF config.json for the fields ModelCenter does not "
                                          "record (default: IN/hf_config.json if present, else Llama-2's)")

    gate = sub.add_parser("gate", parents=[common], help="original LoRA-Flow gate .pt <-> loraflow gate",
                          description=DESCRIPTIONS["gate"],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gate.add_argument("--to", required=True, choices=["loraflow", "original"])
    gate.add_argument("src", metavar="IN", help="original gate .pt, or loraflow gate (folder or X.safetensors)")
    gate.add_argument("out", metavar="OUT", help="--to loraflow: a folder, or X.safetensors (+ X.json); "
                                                 "--to original: a .pt file")
    gate.add_argument("--lora-names", nargs="+", help="LoRA names in gate order (default: from a release name)")
    gate.add_argument("--lora-ids", nargs="+", help="where each LoRA comes from (hub id or path)")
    gate.add_argument("--temperature", type=float, help="inference temperature to record (default 1.0; 1.1 for "
                                                        "the released zh_math and ru_math)")
    gate.add_argument("--base-model", help="base model id to record")
    gate.add_argument("--base-config", help="base model config.json (or folder) to check layers and hidden size")
    gate.add_argument("--dtype", choices=list(DTYPES), default="float16", help="--to original: dtype (float16)")


def run(args: argparse.Namespace) -> int:
    if args.what == "lora":
        convert_lora(args.src, args.out, args.to, base_config=_config_from(args.base_config, "--base-config"),
                     adapter_name=args.adapter_name, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     base_model=args.base_model, force=args.force)
    elif args.what == "base" and args.from_format == "gguf":
        if args.to not in (None, "hf"):
            raise LoraflowError(f"convert base --from gguf writes a Hugging Face folder, not --to {args.to}")
        from .gguf import convert_gguf_to_hf

        convert_gguf_to_hf(args.src, args.out, dtype=DTYPES.get(args.dtype), force=args.force)
    elif args.what == "base":
        if args.to is None:
            raise LoraflowError("convert base: give --to modelcenter or --to hf (or --from gguf)")
        convert_base(args.src, args.out, args.to, reference_config=_config_from(args.hf_config, "--hf-config"),
                     max_shard_size=args.max_shard_size, dtype=DTYPES.get(args.dtype), force=args.force)
    else:
        convert_gate(args.src, args.out, args.to, lora_names=args.lora_names, temperature=args.temperature,
                     base_model=args.base_model, lora_ids=args.lora_ids,
                     base_config=_config_from(args.base_config, "--base-config"), dtype=DTYPES[args.dtype],
                     force=args.force)
    return 0
