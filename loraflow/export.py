"""`loraflow export`: write a LoRA-Flow model folder (the format: `loraflow.fusion.folder`), which
`FlowModel.from_pretrained(OUT)`, `loraflow serve` and the vLLM plugin load."""

from __future__ import annotations

import argparse
import sys

from loraflow.fusion.folder import MODES, export_model_folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--base-model", required=True, help="base causal LM: a local folder or a hub id (safetensors)")
    p.add_argument("--loras", nargs="+", required=True, help="PEFT LoRA folders or hub ids, in fusion order")
    p.add_argument("--lora-names", nargs="+", default=None, help="names for the LoRAs (default: folder names)")
    p.add_argument("--gate", default=None, help="flow mode: a loraflow gate or an original released .pt")
    p.add_argument("--mode", default="flow", choices=MODES, help="fusion mode written into the folder")
    p.add_argument("--static-weights", nargs="+", type=float, default=None, help="static mode: one weight per LoRA")
    p.add_argument("--lora", default=None, help="single mode: the LoRA's index or name (default 0)")
    p.add_argument("--temperature", type=float, default=None,
                   help="gate temperature (default: `loraflow eval`'s rule: the gate file's, else the pair's default "
                        "from the gate's name, e.g. 1.1 for zh_math.pt, else 1.0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the base's)")
    p.add_argument("--weights", default="link", choices=("link", "copy"),
                   help="base weights as hard links (copies where linking fails) or copies")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is done)")


def run(args: argparse.Namespace) -> int:
    temperature = args.temperature
    if args.mode == "flow" and args.gate is not None:
        # the one temperature rule of `loraflow eval`, so a folder runs its gate as eval does (an original zh/ru math
        # .pt records no temperature; the original evaluated it at 1.1)
        from loraflow.eval.registry import resolve_temperature

        temperature, source = resolve_temperature(args.temperature, args.gate)
        print(f"gate temperature {temperature} ({source})", file=sys.stderr)
    out = export_model_folder(args.out, args.base_model, args.loras, gate=args.gate, mode=args.mode,
                              static_weights=args.static_weights, lora=args.lora, temperature=temperature,
                              lora_names=args.lora_names, tokenizer=args.tokenizer, weights=args.weights,
                              overwrite=args.overwrite)
    print(out)
    return 0
