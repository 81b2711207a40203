"""`predictions.jsonl`, the contract between generation and scoring (DESIGN.md): one reader, one writer.

One line per item with `id`, `task`, `language`, `split`, `method`, `prompt`, `generation` (`PREDICTION_FIELDS`).
Generation appends one batch at a time (append, flush, fsync), so a crash loses at most the batch in flight and
can only leave the last line cut short. `read_predictions` reads a file in one of two ways:
- for resuming generation (default): each id once (the first wins), a missing file is empty, and a cut-short last
  line is dropped (with `repair`, the file is rewritten atomically without it and without repeated ids);
- for scoring (`samples=True`): every line counts (lines with the same id are samples, for pass@k); the file must
  exist, hold at least one prediction and give each a string `generation`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_text, iter_jsonl

PREDICTION_FIELDS = ("id", "task", "language", "split", "method", "prompt", "generation")


class Predictions(list):
    """The rows (dicts, `id` a string) of a predictions file, with `lines`: the file line of each row."""

    def __init__(self, rows=(), lines=(), *, path: Path | None = None):
        super().__init__(rows)
        self.lines, self.path = list(lines), path


def _dump(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def read_predictions(path: str | os.PathLike, repair: bool = True, *, samples: bool = False) -> Predictions:
    """The rows of a predictions file (see the module docstring for the two ways of reading it).

    Resuming: only the last line can be a crash artefact (it is the only one written after the others were on
    disk); any other malformed line is an error naming `file:line`: something else wrote to the file.
    """
    path = Path(path)
    if samples:
        return _read_samples(path)
    if not path.is_file():
        return Predictions(path=path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, numbers, seen, changed = [], [], set(), False
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = lineno == len(lines)  # no newline after it: the write may have stopped in the middle
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            missing = [f for f in ("id", "generation") if f not in row]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
        except (ValueError, UnicodeDecodeError) as e:
            if last:
                changed = True
                continue
            raise LoraflowError(f"{path}:{lineno}: not a prediction line ({e}); only a cut-short last line is "
                                "repaired automatically: fix or delete the file") from None
        row["id"] = str(row["id"])
        if row["id"] in seen or last:
            changed = True  # a repeated id, or a complete last line that lost its newline
            if row["id"] in seen:
                continue
        seen.add(row["id"])
        rows.append(row)
        numbers.append(lineno)
    if changed and repair:
        atomic_write_text(path, "".join(_dump(r) for r in rows))
    return Predictions(rows, numbers, path=path)


def _read_samples(path: Path) -> Predictions:
    if not path.is_file():
        raise LoraflowError(f"{path}: predictions file not found")
    rows, numbers = [], []
    for lineno, row in iter_jsonl(path):
        if "id" not in row or not isinstance(row.get("generation"), str):
            raise LoraflowError(f"{path}:{lineno}: a prediction needs an `id` and a string `generation`")
        row["id"] = str(row["id"])
        rows.append(row)
        numbers.append(lineno)
    if not rows:
        raise LoraflowError(f"{path}: no predictions in the file")
    return Predictions(rows, numbers, path=path)


def append_predictions(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Append rows as one write, then flush and fsync: after this returns they survive a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_dump(r) for r in rows))
        f.flush()
        os.fsync(f.fileno())


def write_predictions(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write a whole predictions file at once (atomically)."""
    atomic_write_text(path, "".join(_dump(r) for r in rows))
