"""Datasets: record kinds and their schemas, readers, the data-root layout, and training tokenisation.

A data root (what `scripts/prepare_data.sh` builds, or the release's `data/` folder) holds
`{train,dev,test}/{lang}_{task}_{split}.jsonl` and `system_prompts.json` (keys `{lang}_{task}`).

Every reader validates each record against its kind in `KINDS` and returns `Records`: a list of dicts, each the
file's own fields plus defaults for absent optional fields, plus `"id"` (a string): the record's `task_id` (code
dev/test: MBPP numbers, `HumanEval/N`), else its `id` field, else its 0-based index in the file (= line number - 1
when the file has no blank lines). That id is the key of `predictions.jsonl` and `loraflow score`.
A record that repeats an earlier one exactly (same id, same content) is dropped: the release's zh and es code dev
files list one MBPP problem twice, so they hold 19 distinct problems, not 20. The same id with different content
is an error.

Training examples: `record_io` picks (input, output) by kind; `prompts.training_texts` wraps them in the chat
format; `encode_example` tokenises with the loss mask; `collate` pads a batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.data.prompts import FAITHFUL, training_texts
from loraflow.errors import LoraflowError
from loraflow.files import iter_jsonl, read_json

SPLITS = ("train", "dev", "test")
TASKS = ("math", "code")
IGNORE_INDEX = -100  # label of tokens without loss (prompt, padding): PyTorch's cross-entropy default
SPLIT_TEMPLATE = "{split}/{lang}_{task}_{split}.jsonl"  # the data-root layout: the one place it is written
SPLIT_FILE = re.compile(r"^(?P<lang>[A-Za-z0-9-]+)_(?P<task>[a-z0-9-]+)_(?P<split>train|dev|test)\.jsonl$")
MGSM_FILE = re.compile(r"^mgsm_(?P<lang>[A-Za-z0-9-]+)\.tsv$")


@dataclass(frozen=True)
class Kind:
    """A record kind: its required and optional fields with their types, and what is an input/output."""

    name: str
    fields: dict[str, str]  # required field -> type (a key of `_TYPES`)
    nonempty: tuple[str, ...]  # fields that may not be blank (strings) or empty (lists)
    optional: dict[str, tuple[str, Any]] = field(default_factory=dict)  # field -> (type, default; None = none)
    id_field: str = "id"  # where the record's id comes from when present
    io: tuple[str, str] | None = None  # (input, output) field paths for training; "data.0" indexes a list
    doc: str = ""


_OPT_ID = {"id": ("id", None)}
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("train-math", {"id": "id", "query": "str", "response": "str"}, ("query", "response"),
         io=("query", "response"), doc="translated MetaMathQA (also type, original_*)"),
    Kind("train-code", {"id": "id", "data": "pair"}, ("data",),
         io=("data.0", "data.1"), doc="data = [question, answer]"),
    Kind("dev-math", {"question": "str", "answer": "str"}, ("question", "answer"), _OPT_ID,
         io=("question", "answer"), doc="translated MetaMathQA; answer ends with the result"),
    Kind("dev-code", {"task_id": "id", "text": "str", "code": "str", "test_list": "list[str]"},
         ("text", "code", "test_list"),
         {"test_setup_code": ("str", ""), "challenge_test_list": ("list[str]", [])},
         id_field="task_id", io=("text", "code"), doc="translated MBPP"),
    Kind("test-math", {"question": "str", "answer": "str"}, ("question", "answer"), _OPT_ID,
         doc="MGSM; answer is a string"),
    Kind("test-code", {"task_id": "str", "prompt": "str", "entry_point": "str", "canonical_solution": "str",
                       "test": "str"}, ("task_id", "prompt", "entry_point", "test"),
         id_field="task_id", doc="HumanEval with translated docstrings"),
    Kind("generic", {"prompt": "str", "response": "str"}, ("prompt", "response"), _OPT_ID,
         io=("prompt", "response"), doc="your own training data"),
)}

_TYPES = {  # type name -> (check, description)
    "str": (lambda v: isinstance(v, str), "a string"),
    "id": (lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)), "a string or integer"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "pair": (lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v),
             "a list of 2 strings [input, output]"),
}


class Records(list):
    """A list of validated record dicts, with the `kind`, source `path` and `notes` (e.g. dropped duplicates)."""

    def __init__(self, records=(), *, kind: str, path: Path, notes: Sequence[str] = ()):
        super().__init__(records)
        self.kind, self.path, self.notes = kind, path, list(notes)


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise LoraflowError(f"unknown record kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def parse_split_name(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """`(lang, task, split)` from a file name `{lang}_{task}_{split}.jsonl`, else None."""
    m = SPLIT_FILE.match(Path(path).name)
    return (m["lang"], m["task"], m["split"]) if m else None


def infer_kind(path: str | os.PathLike) -> str:
    """The record kind named by a file name: `{lang}_{task}_{split}.jsonl` -> `{split}-{task}`; `mgsm_*.tsv`."""
    if MGSM_FILE.match(Path(path).name):
        return "test-math"
    parsed = parse_split_name(path)
    if parsed and f"{parsed[2]}-{parsed[1]}" in KINDS:
        return f"{parsed[2]}-{parsed[1]}"
    raise LoraflowError(f"{path}: cannot tell the record kind from the file name (expected "
                        f"{{lang}}_{{math|code}}_{{train|dev|test}}.jsonl); pass a kind: {', '.join(KINDS)}")


def _check(row: dict, kind: Kind, where: str) -> dict:
    """Validate one record; return it with absent optional fields set to their defaults."""
    for name in kind.fields:
        if name not in row:
            raise LoraflowError(f"{where}: missing field {name!r} (a {kind.name} record needs: "
                                f"{', '.join(kind.fields)})")
    checked = dict(row)
    for name, type_name in [*kind.fields.items(), *((n, t) for n, (t, _) in kind.optional.items())]:
        if name not in row:
            default = kind.optional[name][1]
            if default is not None:
                checked[name] = type(default)(default)  # a fresh copy of a mutable default
            continue
        ok, desc = _TYPES[type_name]
        if not ok(row[name]):
            raise LoraflowError(f"{where}: field {name!r} must be {desc}, got {_describe(row[name])}")
    for name in kind.nonempty:
        value = row[name]
        parts = value if kind.fields[name] == "pair" else [value]
        if any(isinstance(p, str) and not p.strip() for p in parts) or value in ("", []):
            raise LoraflowError(f"{where}: field {name!r} is empty")
    return checked


def _describe(value) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} ({', '.join(sorted({type(v).__name__ for v in value})) or 'empty'})"
    return type(value).__name__


def _finish(rows, kind: Kind, path: Path) -> Records:
    """Validate `(line, row)` pairs, attach ids, drop exact repeats, reject conflicting ids."""
    records, seen, notes = [], {}, []
    for index, (line, row) in enumerate(rows):
        rec = _check(row, kind, f"{path}:{line}")
        raw_id = row.get(kind.id_field)
        rec["id"] = str(raw_id) if raw_id is not None else str(index)
        if rec["id"] in seen:
            first_line, first = seen[rec["id"]]
            if first != rec:
                raise LoraflowError(f"{path}:{line}: id {rec['id']!r} was already used at line {first_line} "
                                    "by a different record; ids must be unique")
            notes.append(f"line {line} repeats line {first_line} (id {rec['id']!r}): dropped")
            continue
        seen[rec["id"]] = (line, rec)
        records.append(rec)
    if not records:
        raise LoraflowError(f"{path}: no records")
    return Records(records, kind=kind.name, path=path, notes=notes)


def read_records(path: str | os.PathLike, kind: str | None = None) -> Records:
    """Read and validate a JSONL file (or an MGSM `.tsv`) of `kind` (default: inferred from the file name)."""
    path = Path(path)
    kind = kind or infer_kind(path)
    if path.suffix == ".tsv":
        if kind != "test-math":
            raise LoraflowError(f"{path}: a .tsv file is read as MGSM (kind test-math), not {kind}")
        return read_mgsm_tsv(path)
    return _finish(iter_jsonl(path), get_kind(kind), path)


def read_mgsm_tsv(path: str | os.PathLike) -> Records:
    """MGSM's `question<TAB>answer` lines (no header) as test-math records with line-index ids."""
    path = Path(path)
    if not path.is_file():
        raise LoraflowError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise LoraflowError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise LoraflowError(f"{path}:{lineno}: expected question<TAB>answer, found {len(parts) - 1} tabs")
        rows.append((lineno, {"question": parts[0], "answer": parts[1]}))
    return _finish(rows, KINDS["test-math"], path)


# ---- the data root ----------------------------------------------------------------------------------------------

def kind_of(task: str, split: str) -> str:
    """The record kind of the release's `{lang}_{task}_{split}` files."""
    name = f"{split}-{task}"
    if name not in KINDS:
        raise LoraflowError(f"no record kind for task {task!r} in split {split!r} (tasks: {', '.join(TASKS)}); "
                            f"pass a kind: {', '.join(KINDS)}")
    return name


def split_path(data_root: str | os.PathLike, lang: str, task: str, split: str) -> Path:
    """`data_root/{split}/{lang}_{task}_{split}.jsonl` (not checked for existence)."""
    if split not in SPLITS:
        raise LoraflowError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(data_root) / SPLIT_TEMPLATE.format(split=split, lang=lang, task=task)
    if parse_split_name(path) != (lang, task, split):
        raise LoraflowError(f"bad language {lang!r} or task {task!r}: use letters, digits and '-'")
    return path


def available_splits(data_root: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Every `(lang, task, split)` with a file under `data_root`."""
    found = []
    for split in SPLITS:
        for path in sorted((Path(data_root) / split).glob("*.jsonl")):
            parsed = parse_split_name(path)
            if parsed and parsed[2] == split:
                found.append(parsed)
    return found


def load_split(data_root: str | os.PathLike, lang: str, task: str, split: str, kind: str | None = None) -> Records:
    """The validated records of `{lang}_{task}_{split}`; a missing file is an error that lists what exists."""
    path = split_path(data_root, lang, task, split)
    if not path.is_file():
        have = available_splits(data_root)
        listing = ", ".join("_".join(t) for t in have) or "nothing"
        raise LoraflowError(f"no {lang}_{task}_{split} data: {path} does not exist. Under {data_root} there is: "
                            f"{listing}. Build the data with `bash scripts/prepare_data.sh` "
                            "(MGSM_LANGS adds test sets of more languages)")
    return read_records(path, kind or kind_of(task, split))


def load_system_prompts(data_root: str | os.PathLike) -> dict[str, str]:
    """`data_root/system_prompts.json`: `{lang}_{task}` -> system prompt (non-empty strings)."""
    path = Path(data_root) / "system_prompts.json"
    prompts = read_json(path)
    if not isinstance(prompts, dict):
        raise LoraflowError(f"{path}: expected a JSON object of {{lang}}_{{task}} -> prompt")
    for key, value in prompts.items():
        if not re.fullmatch(r"[A-Za-z0-9-]+_[a-z0-9-]+", key):
            raise LoraflowError(f"{path}: key {key!r} is not of the form {{lang}}_{{task}}")
        if not isinstance(value, str) or not value.strip():
            raise LoraflowError(f"{path}: the prompt of {key!r} must be a non-empty string")
    return prompts


# ---- training examples ------------------------------------------------------------------------------------------

def record_io(record: dict, kind: str) -> tuple[str, str]:
    """`(input, output)` of a training-usable record, stripped as the original did (`query`/`response`, ...)."""
    spec = get_kind(kind)
    if spec.io is None:
        raise LoraflowError(f"{kind} records have no (input, output) pair; use one of "
                            f"{', '.join(k for k, s in KINDS.items() if s.io)}")
    texts = []
    for path in spec.io:
        name, _, index = path.partition(".")
        value = record[name][int(index)] if index else record[name]
        texts.append(value.strip())
    return texts[0], texts[1]


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> dict[str, list[int]]:
    """Token ids and labels of prompt + response; labels are `IGNORE_INDEX` on the prompt, the ids on the response.

    Prompt and response are tokenised separately with `add_special_tokens=False` and concatenated, so the
    boundary is exact and no second BOS appears: the prompt text carries its own BOS (`<s>` in the faithful style,
    whatever the chat template writes otherwise) and the response text its eos.
    Truncation, when the two exceed `max_len`: the prompt loses tokens from its left (after a leading BOS, which
    is kept), so the whole response stays; a response that alone does not fit keeps its first tokens, after the
    BOS, and the prompt is gone (the eos is then lost too).
    """
    if max_len < 2:
        raise LoraflowError(f"max_len must be at least 2, got {max_len}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if not response_ids:
        raise LoraflowError("the response is empty: nothing to train on")
    if len(prompt_ids) + len(response_ids) > max_len:
        bos = tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
        room = max_len - len(head) - len(response_ids)
        if room > 0:
            prompt_ids = head + prompt_ids[len(prompt_ids) - room:]
        else:
            prompt_ids, response_ids = head, response_ids[: max_len - len(head)]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def training_example(tokenizer, record: dict, kind: str, system: str, *, style: str = FAITHFUL,
                     max_len: int = 4096, cot_suffix: bool = False) -> dict[str, list[int]]:
    """One record -> prompt/response texts (`prompts.training_texts`) -> `encode_example`.

    Checks that the response really ends with the tokenizer's eos id: with `faithful` the text ` </s>` must be
    the tokenizer's eos token (true for Llama/Mistral tokenizers); otherwise use `style="chat-template"`.
    """
    input_text, output_text = record_io(record, kind)
    prompt, response = training_texts(system, input_text, output_text, style=style, tokenizer=tokenizer,
                                      cot_suffix=cot_suffix)
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None or not ids or ids[-1] != tokenizer.eos_token_id:
        raise LoraflowError(f"with prompt style {style!r} the response does not end with this tokenizer's eos token "
                            f"({tokenizer.eos_token!r}); use style 'chat-template'")
    return encode_example(tokenizer, prompt, response, max_len)


def collate(batch: Sequence[dict], pad_id: int, padding_side: str = "left",
            pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Pad a batch of `encode_example` outputs to its longest member (never to a fixed length).

    Returns int64 tensors `input_ids`, `attention_mask`, `labels` (padding: `IGNORE_INDEX`) and `position_ids`
    (0 at each sequence's first real token, so left padding does not shift positions), all (batch, seq).
    """
    import torch

    if padding_side not in ("left", "right"):
        raise LoraflowError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise LoraflowError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = {k: torch.full((len(batch), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("position_ids", 0))}
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        out["input_ids"][i, span] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        out["labels"][i, span] = torch.as_tensor(ex["labels"], dtype=torch.long)
        out["attention_mask"][i, span] = 1
        out["position_ids"][i, span] = torch.arange(n)
    return out
