"""The demo's models: loading the tiny base with its LoRAs and gate (`loraflow.eval.registry.apply_method` puts it
under one of the paper's methods)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_flow(base: Path, loras: list[Path], gate: Path | None = None, **kwargs):
    from loraflow import FlowModel
    from loraflow.demo.training import device_and_autocast

    return FlowModel.from_pretrained(str(base), loras=[str(p) for p in loras], gate=str(gate) if gate else None,
                                     device=device_and_autocast()[0], **kwargs)
