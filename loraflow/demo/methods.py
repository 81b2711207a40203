"""The demo's models: loading the tiny base with its LoRAs and gate, and putting it under one of the paper's methods."""

from __future__ import annotations

from pathlib import Path

from loraflow.errors import LoraflowError

METHODS = ("base", "lang", "task", "average", "lorahub", "flow")


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_flow(base: Path, loras: list[Path], gate: Path | None = None, **kwargs):
    from loraflow import FlowModel
    from loraflow.demo.training import device_and_autocast

    return FlowModel.from_pretrained(str(base), loras=[str(p) for p in loras], gate=str(gate) if gate else None,
                                     device=device_and_autocast()[0], **kwargs)


def set_method(flow, method: str, lorahub_weights: list[float] | None = None) -> None:
    if method == "base":
        flow.set_mode("base")
    elif method == "lang":
        flow.set_mode("single", lora=0)
    elif method == "task":
        flow.set_mode("single", lora=1)
    elif method == "average":
        flow.set_mode("static", weights=[1.0 / flow.k] * flow.k)
    elif method == "lorahub":
        flow.set_mode("static", weights=lorahub_weights)
    elif method == "flow":
        flow.set_mode("flow")
    else:
        raise LoraflowError(f"unknown method {method!r}; methods: {METHODS}")
