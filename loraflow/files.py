"""Small file helpers shared by every module that reads user files or writes results.

- atomic writes (temp file in the same folder, then `os.replace`), so a crash never leaves a half-written file
  that looks complete; the result gets the mode a plain `open(path, "w")` would give (0644 under umask 022), not
  the temp file's private 0600 (`publish_mode`, also for staged folders);
- JSONL reading with `file:line` in every error;
- checkpoint loading that never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import LoraflowError

if TYPE_CHECKING:  # torch is imported where tensors are loaded, so data-only commands start fast
    import torch


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else by setting
    and restoring it under a lock (os.umask is the only portable way to read it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file or folder made by `tempfile` (always 0600 / 0700) the mode that creating it directly would have:
    0666 (files) or 0777 (folders) less the umask. Called by every atomic writer just before the rename."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path` (with the umask's mode, see
    `publish_mode`), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoraflowError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line of a JSON-lines file (1-based line numbers).

    Anything malformed (bad JSON, a non-object line, bytes that are not UTF-8) raises `LoraflowError` naming
    `file:line`.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LoraflowError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise LoraflowError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
        except UnicodeDecodeError:
            # decoding runs ahead of the lines handed out, so the line number is approximate
            raise LoraflowError(f"{path}:{lineno + 1}: not valid UTF-8 text (at or after this line)") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file of objects; blank lines are skipped, anything else malformed names `file:line`."""
    return [row for _, row in iter_jsonl(path)]


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat tensor dict from `.safetensors`, or from a `.bin`/`.pt` pickle with `weights_only=True`.

    A pickle that holds anything but tensors and plain containers (e.g. an object with a malicious `__reduce__`)
    is refused with a `LoraflowError`; nothing in it is executed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraflowError(
            f"{path}: refused to load: not a plain tensor checkpoint ({first}). loraflow only loads pickles with "
            "weights_only=True; convert the file to safetensors with trusted code if you know where it came from."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraflowError(f"{path}: expected a flat dict of tensors, got {type(obj).__name__}")
    return obj


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write tensors atomically: safetensors for `.safetensors`, else a plain `torch.save` dict (tensors only)."""
    import torch

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            with open(tmp, "wb") as f:  # a handle, so the archive name inside is not the random temp name
                torch.save(tensors, f)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
