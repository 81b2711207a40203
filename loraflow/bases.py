"""Loading the base model and its tokenizer: a folder, a hub id, or a GGUF file, with one-line errors.

Every command that takes a base (`train`, `eval`, `plot-gates`, `FlowModel.from_pretrained`) goes through here, so
a wrong `--base` is one line naming it (not transformers' traceback), and `gguf_file` works everywhere:
`base=FOLDER, gguf_file=NAME` (transformers' convention, also for a hub repo) or `base=path/to/model.gguf`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from loraflow.errors import LoraflowError, first_line


def looks_local(text: str) -> bool:
    """True when `text` can only mean a local path: it starts with `.`, `/` or `~`, uses a backslash, or it has a
    path separator and its first component exists here (`checkpoints/LoRAs/zh_lroa` when `checkpoints/` exists)."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return True
    parts = text.split("/")
    return len(parts) > 1 and Path(parts[0]).exists()


def missing_path_hint(path: str) -> str:
    """`(X exists and holds: a, b, c)` for the deepest existing parent of a missing local path."""
    parent = Path(path).expanduser()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f" ({parent} exists and holds: {shown or 'nothing'})"


def resolve_base(base: str | os.PathLike, gguf_file: str | None = None,
                 need_config: bool = True) -> tuple[str, str | None]:
    """(what to pass to transformers, gguf file name or None), after checking that `base` can be loaded at all
    (`need_config=False`: a tokenizer-only folder will do)."""
    text = str(base)
    path = Path(text).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise LoraflowError(f"base model {text}: no such GGUF file{missing_path_hint(text)}")
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise LoraflowError(f"base model {text}: no GGUF file {gguf_file} in it"
                                    f"{missing_path_hint(str(path / gguf_file))}")
        elif need_config and not (path / "config.json").is_file():
            raise LoraflowError(f"base model {text}: the folder has no config.json (a Hugging Face model folder is "
                                "needed; for a GGUF file pass --gguf-file)")
        return str(path), gguf_file
    if looks_local(text) or path.exists():
        raise LoraflowError(f"base model {text}: no such folder{missing_path_hint(text)}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise LoraflowError(f"base model {text!r}: neither a folder nor a valid hub id (owner/name)") from None
    return text, gguf_file


GGUF_INSTALL_HINT = "pip install -e .[realmodel]"


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LoraflowError(f"reading a GGUF file needs the `gguf` package: pip install gguf (or {GGUF_INSTALL_HINT})")


def load_base_model(base: str | os.PathLike, gguf_file: str | None = None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` on a checked base; a GGUF file is dequantized (`pip install gguf`)."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, "the base model", base, gguf_file, True, kwargs)


def load_base_tokenizer(base: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer beside the base model (or in its GGUF file)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, "a tokenizer from", base, gguf_file, False, {})


def _from_pretrained(auto_class, what: str, base, gguf_file: str | None, need_config: bool, kwargs: dict):
    source, gguf_file = resolve_base(base, gguf_file, need_config=need_config)
    if gguf_file is not None:
        require_gguf()
        kwargs = {**kwargs, "gguf_file": gguf_file}
    # a GGUF file's metadata can also fail as KeyError (an unknown field) or RuntimeError (an unknown tensor type)
    errors = (OSError, ValueError, KeyError, RuntimeError) if gguf_file is not None else (OSError, ValueError)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except errors as e:
        raise LoraflowError(f"cannot load {what} {base}: {first_line(e)}") from None

