"""`loraflow data`: validate data files and build the data root that training and evaluation read.

  loraflow data check FILE_OR_DIR [--kind K]      validate one file, or every file of a data root
  loraflow data prepare --src DIR --out data [--mgsm-src DIR] [--mgsm-langs en,de] [--force]
  loraflow data mgsm-to-jsonl mgsm_de.tsv data/test/de_math_test.jsonl [--force]

`prepare` copies the release's train/dev/test files and system_prompts.json from --src (a folder laid out like
thunlp/LoRAFlow's `data/`) and converts MGSM TSVs of more languages into test/{lang}_math_test.jsonl.
Everything is validated (schema, and the release's record counts) before anything is written; each file is
written atomically; an existing file with the same content is left alone, one with different content is an
error unless --force. `scripts/prepare_data.sh` wraps this and can download the sources.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from loraflow.data.records import (
    KINDS,
    MGSM_FILE,
    SPLIT_TEMPLATE,
    SPLITS,
    TASKS,
    infer_kind,
    load_system_prompts,
    parse_split_name,
    read_records,
)
from loraflow.errors import LoraflowError
from loraflow.eval.registry import RELEASE_LANGUAGES
from loraflow.files import atomic_path

# Record counts of the release (and of MGSM); a file that differs was truncated or is not the release's.
# Code dev: 20 lines, but zh and es list one MBPP problem twice, which `read_records` drops.
RELEASE_LANGS = RELEASE_LANGUAGES
EXPECTED_COUNTS = {"train-math": (200,), "train-code": (200,), "dev-math": (100,), "dev-code": (19, 20),
                   "test-math": (250,), "test-code": (164,)}


@dataclass
class Planned:
    """One output file of `prepare`: where it goes, its bytes, and what the summary says about it."""

    rel: str  # path relative to the output root
    data: bytes
    kind: str
    count: int
    action: str  # "copy" or "convert"
    status: str = ""
    note: str = ""


def _counted(path: Path, kind: str | None = None, strict: bool = True):
    """`read_records` plus the release's count check."""
    records = read_records(path, kind)
    expected = EXPECTED_COUNTS.get(records.kind)
    if strict and expected and len(records) not in expected:
        raise LoraflowError(f"{path}: {len(records)} {records.kind} records, expected "
                            f"{' or '.join(map(str, expected))} (a truncated or foreign file?)")
    return records


def mgsm_jsonl(records) -> bytes:
    """Test-math records as the release writes them: one `{"question", "answer"}` object per line."""
    lines = (json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False) for r in records)
    return ("\n".join(lines) + "\n").encode("utf-8")


def _resolve_src(src: Path) -> Path:
    for cand in (src, src / "data"):
        if all((cand / s).is_dir() for s in SPLITS) and (cand / "system_prompts.json").is_file():
            return cand
    raise LoraflowError(f"{src}: not a LoRA-Flow data folder (expected train/ dev/ test/ and system_prompts.json, "
                        "as in thunlp/LoRAFlow's data/)")


def plan(src: str | os.PathLike, mgsm_src: str | os.PathLike | None = None,
         mgsm_langs: tuple[str, ...] = ("en",)) -> tuple[list[Planned], list[str]]:
    """Read and validate every source file; return the files to write and notes for the summary."""
    src = _resolve_src(Path(src))
    load_system_prompts(src)
    out = [Planned("system_prompts.json", (src / "system_prompts.json").read_bytes(), "system-prompts", 0, "copy")]
    notes = []
    for split in SPLITS:
        for path in sorted((src / split).iterdir()):
            parsed = parse_split_name(path)
            if not parsed or parsed[2] != split or f"{split}-{parsed[1]}" not in KINDS:
                notes.append(f"ignored {split}/{path.name} (not a {{lang}}_{{math|code}}_{split}.jsonl file)")
                continue
            records = _counted(path)
            note = "; ".join(records.notes)
            out.append(Planned(f"{split}/{path.name}", path.read_bytes(), records.kind, len(records), "copy",
                               note=note))
    have = {p.rel for p in out}
    for lang in mgsm_langs:
        rel = SPLIT_TEMPLATE.format(split="test", lang=lang, task="math")
        if rel in have:
            notes.append(f"MGSM {lang}: kept the release's {rel}")
            continue
        if mgsm_src is None:
            raise LoraflowError(f"MGSM language {lang!r} asked for but no MGSM folder given (--mgsm-src)")
        tsv = Path(mgsm_src) / f"mgsm_{lang}.tsv"
        if not tsv.is_file():
            langs = sorted(m["lang"] for p in Path(mgsm_src).glob("mgsm_*.tsv") if (m := MGSM_FILE.match(p.name)))
            raise LoraflowError(f"{tsv}: file not found; MGSM languages in {mgsm_src}: {', '.join(langs) or 'none'}")
        records = _counted(tsv)
        out.append(Planned(rel, mgsm_jsonl(records), records.kind, len(records), "convert"))
    found = {p.rel for p in out}
    missing = [f"{lang}_{task}_{split}" for split in SPLITS for task in TASKS for lang in RELEASE_LANGS
               if SPLIT_TEMPLATE.format(split=split, lang=lang, task=task) not in found]
    if missing:
        notes.append(f"the source lacks {len(missing)} of the release's files: {', '.join(missing)}")
    return out, notes


def write_planned(files: list[Planned], out: str | os.PathLike, force: bool = False) -> None:
    """Write every planned file atomically; refuse (before writing any) to replace a file with other content."""
    out = Path(out)
    conflicts = []
    for f in files:
        target = out / f.rel
        if not target.exists():
            f.status = "copied" if f.action == "copy" else "converted"
        elif target.is_file() and target.read_bytes() == f.data:
            f.status = "unchanged"
        elif force and target.is_file():
            f.status = "overwritten"
        else:
            conflicts.append(str(target))
    if conflicts:
        raise LoraflowError(f"{len(conflicts)} file(s) already exist with different content: {', '.join(conflicts)}. "
                            "Nothing was written; remove them or rerun with --force (FORCE=1)")
    for f in files:
        if f.status != "unchanged":
            with atomic_path(out / f.rel) as tmp:
                tmp.write_bytes(f.data)


def check_tree(root: str | os.PathLike, strict: bool = True) -> list[tuple[str, str, int, str]]:
    """Validate every `{split}/{lang}_{task}_{split}.jsonl` and system_prompts.json under `root`."""
    root = Path(root)
    rows = [("system_prompts.json", "system-prompts", len(load_system_prompts(root)), "ok")]
    for split in SPLITS:
        for path in sorted((root / split).glob("*.jsonl")):
            try:
                kind = infer_kind(path)
            except LoraflowError:
                rows.append((f"{split}/{path.name}", "?", 0, "skipped: kind unknown (check it with --kind)"))
                continue
            records = _counted(path, kind, strict=strict)
            status = "ok" + (f" ({len(records.notes)} duplicate dropped)" if records.notes else "")
            rows.append((f"{split}/{path.name}", records.kind, len(records), status))
    return rows


def _table(rows) -> str:
    header = ("file", "kind", "count", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"
                     for r in [header, *rows])


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="action", required=True)
    p = sub.add_parser("check", help="validate a data file (or every file of a data root)")
    p.add_argument("path", help="a .jsonl/.tsv file, or a data root with train/ dev/ test/")
    p.add_argument("--kind", choices=list(KINDS), help="record kind (default: from the file name)")
    p = sub.add_parser("prepare", help="build a data root from the release's data/ folder and MGSM TSVs")
    p.add_argument("--src", required=True, help="folder laid out like thunlp/LoRAFlow's data/")
    p.add_argument("--out-dir", dest="out", default="data", help="output data root (default: data)")
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the old spelling, for one release
    p.add_argument("--mgsm-src", help="folder of mgsm_{lang}.tsv (google-research/url-nlp mgsm/)")
    p.add_argument("--mgsm-langs", default="en", help="comma-separated MGSM languages to add (default: en; '' none)")
    p.add_argument("--force", action="store_true", help="overwrite existing files whose content differs")
    p = sub.add_parser("repair-humaneval", help="write the repaired HumanEval prompts (English signatures, translated "
                                                "docstrings; loraflow/eval/repair.py) of a data root's test files")
    p.add_argument("--data-root", default="data", help="holds test/{lang}_code_test.jsonl (default: data)")
    p.add_argument("--languages", default="es,ru", help="comma-separated (default: es,ru)")
    p.add_argument("--out", required=True, help="folder for {lang}_code_test.repaired.jsonl")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p = sub.add_parser("mgsm-to-jsonl", help="convert one MGSM TSV into a test-math JSONL file")
    p.add_argument("tsv")
    p.add_argument("out")
    p.add_argument("--force", action="store_true", help="overwrite an existing file whose content differs")


def run(args) -> int:
    if args.action == "check":
        path = Path(args.path)
        if path.is_dir():
            print(_table(check_tree(path, strict=False)))
            return 0
        records = read_records(path, args.kind)
        print(f"{path}: {records.kind}, {len(records)} records, OK")
        for note in records.notes:
            print(f"  note: {note}")
        return 0
    if args.action == "repair-humaneval":
        return _repair_humaneval(args.data_root, [x.strip() for x in args.languages.split(",") if x.strip()],
                                 Path(args.out), args.force)
    if args.action == "mgsm-to-jsonl":
        records = read_records(args.tsv, "test-math")
        out = Path(args.out)
        planned = [Planned(out.name, mgsm_jsonl(records), "test-math", len(records), "convert")]
        write_planned(planned, out.parent, force=args.force)
        print(f"{out}: {len(records)} test-math records, {planned[0].status}")
        return 0
    langs = tuple(x.strip() for x in args.mgsm_langs.split(",") if x.strip())
    files, notes = plan(args.src, args.mgsm_src, langs)
    write_planned(files, args.out, force=args.force)
    for f in files:  # read back what is now on disk
        target = Path(args.out) / f.rel
        f.count = len(load_system_prompts(args.out)) if f.rel == "system_prompts.json" else len(_counted(target))
    print(_table([(f.rel, f.kind, f.count, f.status + (f" ({f.note})" if f.note else "")) for f in files]))
    for note in notes:
        print(f"note: {note}")
    print(f"{args.out}: {len(files)} files OK")
    return 0


def _repair_humaneval(data_root, languages: list[str], out: Path, force: bool) -> int:
    import json

    from loraflow.data.records import load_split
    from loraflow.eval.humaneval import load_english_humaneval
    from loraflow.eval.repair import repaired_records
    from loraflow.files import atomic_write_text

    english = load_english_humaneval()
    for lang in languages:
        records = load_split(data_root, lang, "code", "test")
        target = out / f"{lang}_code_test.repaired.jsonl"
        if target.exists() and not force:
            raise LoraflowError(f"{target} exists; pass --force to overwrite it")
        fields = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
        rows = [{k: r[k] for k in fields} for r in repaired_records(records, english, str(records.path))]
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{target}: {len(rows)} repaired prompts")
    return 0
