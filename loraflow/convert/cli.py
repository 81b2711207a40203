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

from loraflow.convert.formats import DTYPES, config_from, convert_base, convert_gate, convert_lora
from loraflow.errors import LoraflowError

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
        convert_lora(args.src, args.out, args.to, base_config=config_from(args.base_config, "--base-config"),
                     adapter_name=args.adapter_name, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     base_model=args.base_model, force=args.force)
    elif args.what == "base" and args.from_format == "gguf":
        if args.to not in (None, "hf"):
            raise LoraflowError(f"convert base --from gguf writes a Hugging Face folder, not --to {args.to}")
        from loraflow.convert.gguf import convert_gguf_to_hf

        convert_gguf_to_hf(args.src, args.out, dtype=DTYPES.get(args.dtype), force=args.force)
    elif args.what == "base":
        if args.to is None:
            raise LoraflowError("convert base: give --to modelcenter or --to hf (or --from gguf)")
        convert_base(args.src, args.out, args.to, reference_config=config_from(args.hf_config, "--hf-config"),
                     max_shard_size=args.max_shard_size, dtype=DTYPES.get(args.dtype), force=args.force)
    else:
        convert_gate(args.src, args.out, args.to, lora_names=args.lora_names, temperature=args.temperature,
                     base_model=args.base_model, lora_ids=args.lora_ids,
                     base_config=config_from(args.base_config, "--base-config"), dtype=DTYPES[args.dtype],
                     force=args.force)
    return 0
