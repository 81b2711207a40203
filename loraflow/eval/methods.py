"""The model of each method (`loraflow.eval.registry.METHODS`), for evaluation: typed library functions.

`load_method_model` loads exactly the LoRAs a method needs (none for `base`, one for `lang` / `task`, both for the
fusions) and puts the model under the method (`registry.apply_method`); LoRA-Hub's static weights are set by the
caller once searched (`lorahub_examples` gives the search its training examples).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from loraflow.eval.registry import Benchmark, apply_method, get_method, load_system_prompts


def load_method_model(base_model: str, method: str, loras: Sequence[str], *, gate: str | None = None,
                      temperature: float | None = None, dtype: str = "float32", device: str = "cpu",
                      check_lora_names: bool = True, gguf_file: str | None = None):
    """The model of one method: the plain base for `base`, else a FlowModel on `loras` (the method's own, in
    fusion order) under the method. `lorahub` starts from the average until its searched weights are set.
    `gguf_file`: the base is that GGUF file in `base_model`'s folder or repo."""
    from loraflow.devices import torch_dtype

    m = get_method(method)
    if m.mode == "base":
        from loraflow.bases import load_base_model

        return load_base_model(base_model, gguf_file, dtype=torch_dtype(dtype)).to(device).eval()
    from loraflow.fusion.model import FlowModel

    flow = FlowModel.from_pretrained(base_model, list(loras), gate=gate if m.mode == "flow" else None,
                                     temperature=temperature, torch_dtype=torch_dtype(dtype), device=device,
                                     mode="base", check_lora_names=check_lora_names,
                                     gguf_file=gguf_file)
    k = len(loras)
    apply_method(flow, method, roles=m.loras, weights=[1.0 / k] * k if m.weights == "searched" else None)
    return flow


def lorahub_examples(task: Benchmark, language: str, data_root: str | os.PathLike, tokenizer, *,
                     prompt_style: str, limit: int | None = None) -> list[dict]:
    """The training examples of `{lang}_{task}`, tokenised with the loss on the response only."""
    from loraflow.data.prompts import system_prompt
    from loraflow.data.records import load_split, training_example

    records = load_split(data_root, language, task.domain, "train")
    kind = records.kind
    if limit:
        records = records[:limit]
    system = system_prompt(load_system_prompts(data_root), language, task.domain)
    return [training_example(tokenizer, r, kind, system, style=prompt_style) for r in records]


def gate_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a gate's tensor file (None when there is none)."""
    from loraflow.files import sha256_file
    from loraflow.fusion.checkpoints import gate_files

    tensor_file = gate_files(Path(path))[0]
    return sha256_file(tensor_file) if tensor_file.is_file() else None
