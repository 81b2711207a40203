"""Reading and writing checkpoints that may be sharded, a tensor (or a shard) at a time, and publishing outputs
atomically.

- `TensorSource`: the tensors of a file or a folder (`model.safetensors`, `*.safetensors` + `*.index.json`,
  `pytorch_model-0000i-of-0000n.bin` with or without an index, ...). safetensors are opened lazily (`safe_open`,
  one tensor at a time); pickles only through `files.load_tensors` (weights_only), one shard at a time.
- `ShardWriter`: writes tensors into shards of at most `max_shard_bytes` plus a Hugging Face style index.
- `staged_output`: everything is written into `OUT.tmp-xxxx/` and moved into place only when complete; an existing
  output is kept if identical, and replaced only with `force`. A failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from loraflow.errors import LoraflowError
from loraflow.files import load_tensors, publish_mode, read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<ext>\.\w+)$")


def _shard_name(filename: str, i: int, n: int) -> str:
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}-{i:05d}-of-{n:05d}.{ext}"


class TensorSource:
    """The tensors of a checkpoint file, or of a folder holding one of `names` (single file, index or shards)."""

    def __init__(self, path: str | Path, names: Sequence[str]):
        self.path = Path(path)
        self.weight_map: dict[str, str] | None = None
        self._cache: dict[Path, dict[str, torch.Tensor]] = {}
        if self.path.is_file():
            self.shards = [self.path]
        elif self.path.is_dir():
            self.shards = self._find(names)
        else:
            raise LoraflowError(f"{self.path}: no such file or folder")
        self.safetensors = all(s.suffix == ".safetensors" for s in self.shards)
        if not self.safetensors and any(s.suffix not in PICKLE_SUFFIXES for s in self.shards):
            raise LoraflowError(f"{self.path}: unsupported weight files {[s.name for s in self.shards]}")

    def _find(self, names: Sequence[str]) -> list[Path]:
        for name in names:
            index = self.path / f"{name}.index.json"
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise LoraflowError(f"{index}: no weight_map")
                shards = [self.path / f for f in dict.fromkeys(weight_map.values())]
                absent = [s.name for s in shards if not s.is_file()]
                if absent:
                    raise LoraflowError(f"{index}: lists shards that are not there: {absent}")
                self.weight_map = weight_map
                return shards
            if (self.path / name).is_file():
                return [self.path / name]
            stem, ext = name.rsplit(".", 1)
            shards = sorted(self.path.glob(f"{stem}-*-of-*.{ext}"))
            if shards:
                n = int(_SHARD.match(shards[0].name)["n"]) if _SHARD.match(shards[0].name) else -1
                expected = [_shard_name(name, i, n) for i in range(1, n + 1)]
                if [s.name for s in shards] != expected:
                    raise LoraflowError(f"{self.path}: incomplete shards {[s.name for s in shards]} "
                                        f"(expected {expected[:3]}...) and no {name}.index.json")
                return shards
        there = sorted(p.name for p in self.path.iterdir())[:12]
        raise LoraflowError(f"{self.path}: found none of {list(names)} (nor their .index.json or shards); "
                            f"the folder holds {there}")

    def _load(self, shard: Path) -> dict[str, torch.Tensor]:
        if shard in self._cache:  # read once for `shapes()`; handed over (not kept) for the conversion
            return self._cache.pop(shard)
        tensors = load_tensors(shard)
        if self.weight_map is not None:
            listed = {k for k, f in self.weight_map.items() if f == shard.name}
            if set(tensors) != listed:
                extra, absent = sorted(set(tensors) - listed)[:5], sorted(listed - set(tensors))[:5]
                raise LoraflowError(f"{shard}: tensors differ from its index (extra {extra}, absent {absent})")
        return tensors

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        """{name: shape}: from safetensors headers (no tensor read); for indexed pickles shapes are None until read."""
        from safetensors import safe_open

        if not self.safetensors and self.weight_map is not None:
            return dict.fromkeys(self.weight_map)
        out: dict[str, tuple[int, ...] | None] = {}
        for shard in self.shards:
            if self.safetensors:
                with safe_open(str(shard), framework="pt") as f:
                    part = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
            else:
                tensors = self._load(shard)
                if len(self.shards) == 1:
                    self._cache[shard] = tensors  # the only shard: keep it for `iter_shards`, don't read it twice
                part = {k: tuple(v.shape) for k, v in tensors.items()}
            dup = sorted(set(part) & set(out))
            if dup:
                raise LoraflowError(f"{shard}: tensors also found in another shard: {dup[:5]}")
            out.update(part)
        return out

    def iter_shards(self) -> Iterator[tuple[Path, Iterator[tuple[str, torch.Tensor]]]]:
        """(shard, (name, tensor) pairs): safetensors one tensor at a time, pickles one shard at a time."""
        from safetensors import safe_open

        for shard in self.shards:
            if self.safetensors:
                def lazy(shard=shard):
                    with safe_open(str(shard), framework="pt") as f:
                        for key in f.keys():  # noqa: SIM118 (not a dict)
                            yield key, f.get_tensor(key)
                yield shard, lazy()
            else:
                yield shard, iter(self._load(shard).items())

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor in one dict (for small checkpoints: LoRAs, gates)."""
        return {k: v for _, pairs in self.iter_shards() for k, v in pairs}


def parse_size(text: str | int | None) -> int | None:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20, '0'/None -> None (no limit)."""
    if text is None or isinstance(text, int):
        return text or None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise LoraflowError(f"size {text!r}: expected e.g. 5GB, 500MB, 64KiB or a number of bytes")
    unit = (m[2] or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m[1]) * scale) or None


def save_pickle(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """torch.save through a file handle: the archive name inside is then fixed, so equal dicts give equal bytes."""
    with open(path, "wb") as f:
        torch.save(tensors, f)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its storage (views would drag, or share, their whole storage)."""
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


class ShardWriter:
    """Write tensors to `folder/filename`, split into `stem-0000i-of-0000n.ext` + `filename.index.json` when they
    exceed `max_shard_bytes`. Holds at most one shard's tensors in memory."""

    def __init__(self, folder: Path, filename: str, max_shard_bytes: int | None = None):
        self.folder, self.filename, self.max_bytes = Path(folder), filename, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.max_bytes and self.buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self.buffer[key] = _own_storage(tensor)
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".part-{len(self.written):05d}-{self.filename}"
        if self.filename.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(self.buffer, str(path), metadata={"format": "pt"})
        else:
            save_pickle(path, self.buffer)
        self.written.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish the last shard, name the shards, write the index if there are several; return the file names."""
        if self.buffer or not self.written:
            self._flush()
        n = len(self.written)
        names = [self.filename] if n == 1 else [_shard_name(self.filename, i + 1, n) for i in range(n)]
        for (path, _), name in zip(self.written, names, strict=True):
            path.rename(self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: name for (_, keys), name in zip(self.written, names, strict=True) for k in keys}}
            (self.folder / f"{self.filename}.index.json").write_text(json.dumps(index, indent=2) + "\n")
            names.append(f"{self.filename}.index.json")
        return names


def _same(a: Path, b: Path) -> bool:
    if a.is_dir():
        if not b.is_dir():
            return False
        fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)
    return b.is_file() and filecmp.cmp(a, b, shallow=False)


class Staged:
    """What `staged_output` yields: `path`, the private folder to write into; `status` once it is published."""

    def __init__(self, path: Path):
        self.path, self.status = path, ""


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool = False, files: Sequence[str] | None = None) -> Iterator[Staged]:
    """Write into a fresh `OUT.tmp-xxxx/` folder, then publish it.

    `files=None`: the folder becomes OUT. Otherwise the folder holds these file names, which are moved next to OUT
    (e.g. `X.safetensors` + `X.json`). Publishing: if every target already exists with identical bytes,
    nothing changes (status "unchanged"); if a target exists and differs, it is refused unless `force` ("replaced");
    else "written". On any error the temporary folder is removed and no target is touched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Staged(Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent)))
    try:
        yield stage
        pairs = [(stage.path, out)] if files is None else [(stage.path / f, out.parent / f) for f in files]
        existing = [dst for _, dst in pairs if dst.exists()]
        if existing and len(existing) == len(pairs) and all(_same(src, dst) for src, dst in pairs):
            stage.status = "unchanged"
            return
        if existing and not force:
            raise LoraflowError(f"{', '.join(map(str, existing))} already exists and differs from this conversion's "
                                "output; pass --force to replace it (or choose another output path)")
        backups = []
        for src, _ in pairs:  # mkdtemp's folder is 0700: published files and folders get the umask's mode
            publish_mode(src)
        for src, dst in pairs:
            if dst.exists():
                backup = dst.with_name(f"{dst.name}.old-{stage.path.name.rsplit('-', 1)[-1]}")
                dst.rename(backup)
                backups.append(backup)
            src.rename(dst)
        for backup in backups:
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
        stage.status = "replaced" if existing else "written"
    finally:
        shutil.rmtree(stage.path, ignore_errors=True)
