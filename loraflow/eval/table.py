"""`loraflow eval-table`: the paper's results table from `results.json` files, beside the published numbers.

  loraflow eval-table outputs/eval [--split test] [--out outputs/eval/table.md]

Rows are runs (the method, or the run's --name when it differs; runs on the repaired HumanEval prompts,
`--variant repaired`, are rows of their own), in the paper's order; columns are MGSM and HumanEval in zh, ru, es
and their average (only when all three are there). Each cell reads `faithful / strict (published)`: the original
harness's scoring (`accuracy`, `pass@1`), loraflow's strict scoring (`accuracy_strict`, `pass@1_strict`; left out
when a results file has none), and LoRA-Flow's Table 2 (Llama-2-7B, SPEC §4). A missing result is shown as "–".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loraflow.errors import LoraflowError
from loraflow.eval.registry import BENCHMARKS as REGISTRY
from loraflow.eval.registry import METHODS, RELEASE_LANGUAGES
from loraflow.eval.repair import RELEASED
from loraflow.files import atomic_write_text

LANGUAGES = RELEASE_LANGUAGES
# (task, title, headline metric) of the paper's columns: the test benchmarks of the registry
BENCHMARKS = tuple((b.name, b.title, b.metric) for b in (REGISTRY["mgsm"], REGISTRY["humaneval"]))
METHOD_TITLES = {name: method.title for name, method in METHODS.items()}
# Wang et al. (ACL 2024), Table 2: MGSM accuracy and HumanEval pass@1 in %, zh / ru / es / avg.
PUBLISHED = {
    "base": {"mgsm": (4.4, 3.2, 2.4, 3.3), "humaneval": (0.0, 0.0, 2.4, 0.8)},
    "lang": {"mgsm": (5.2, 3.6, 3.6, 4.1), "humaneval": (12.2, 14.0, 10.4, 12.2)},
    "task": {"mgsm": (26.8, 32.8, 41.2, 33.6), "humaneval": (18.3, 23.2, 21.9, 21.1)},
    "average": {"mgsm": (12.8, 10.4, 18.4, 13.9), "humaneval": (17.1, 17.7, 18.3, 17.7)},
    "lorahub": {"mgsm": (20.8, 28.4, 36.8, 28.7), "humaneval": (19.5, 21.3, 20.1, 20.3)},
    "flow": {"mgsm": (33.2, 37.6, 42.0, 37.6), "humaneval": (20.7, 23.8, 23.2, 22.6)},
}
MISSING = "–"


def collect(roots, split: str = "test") -> dict[tuple[str, str], dict[tuple[str, str], tuple[float, float | None]]]:
    """{(row name, method): {(task, language): (faithful, strict or None) in %}} from every results.json under
    `roots`."""
    metric_of = {task: metric for task, _, metric in BENCHMARKS}
    rows: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise LoraflowError(f"{root}: no such folder")
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for path in files:
            try:
                res = json.loads(path.read_text(encoding="utf-8"))
                task, lang, method = res["task"], res["language"], res["method"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                print(f"warning: {path}: skipped, not a loraflow results file ({e})", file=sys.stderr)
                continue
            if task not in metric_of or res.get("split", "test") != split:
                continue
            value = (res.get("metrics") or {}).get(metric_of[task])
            if not isinstance(value, (int, float)):
                print(f"warning: {path}: no {metric_of[task]!r} metric; skipped", file=sys.stderr)
                continue
            strict = (res.get("metrics") or {}).get(metric_of[task] + "_strict")
            name = res.get("name") or method
            if res.get("variant", RELEASED) != RELEASED:
                name = f"{name}, {res['variant']} prompts"
            rows.setdefault((name, method), {})[(task, lang)] = (
                100.0 * float(value), 100.0 * float(strict) if isinstance(strict, (int, float)) else None)
    return rows


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if all(v is not None for v in values) else None


def render(rows: dict[tuple[str, str], dict[tuple[str, str], float]], published: bool = True) -> str:
    """The markdown table; every cell `ours (published)` when `published`."""
    order = {m: i for i, m in enumerate(METHOD_TITLES)}
    keys = list(rows)
    for method in METHOD_TITLES:  # the paper's rows are always shown, so missing runs are visible
        if published and not any(m == method for _, m in keys):
            keys.append((method, method))
    keys.sort(key=lambda k: (order.get(k[1], len(order)), k[0] != k[1], k[0]))
    header = ["Method"] + [f"{title} {c}" for _, title, _ in BENCHMARKS for c in (*LANGUAGES, "avg")]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, method in keys:
        values = rows.get((name, method), {})
        label = METHOD_TITLES.get(method, method) + (f" ({name})" if name != method else "")
        cells = [label]
        for task, _, _ in BENCHMARKS:
            pairs = [values.get((task, lang)) for lang in LANGUAGES]
            faithful = [p[0] if p else None for p in pairs]
            strict = [p[1] if p else None for p in pairs]
            faithful.append(_mean(faithful))
            strict.append(_mean(strict) if any(p for p in pairs) else None)
            paper = PUBLISHED.get(method, {}).get(task)
            for i, (f, st) in enumerate(zip(faithful, strict)):
                cells.append(_fmt(f) + (f" / {_fmt(st)}" if st is not None else "")
                             + (f" ({paper[i]:.1f})" if published and paper else ""))
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nMGSM accuracy and HumanEval pass@1, %: faithful (the original harness's scoring) / strict (loraflow's). "
            + ("In parentheses: published (Wang et al., ACL 2024, Llama-2-7B). " if published else "")
            + f"{MISSING}: not run.\n")
    return "\n".join(lines) + "\n" + note


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="folders searched for results.json (or results.json files)")
    p.add_argument("--split", default="test", choices=("test", "dev"), help="which split's results (test)")
    p.add_argument("--out", help="also write the table to this file (a file, not a folder)")
    p.add_argument("--no-published", action="store_true", help="leave out the published numbers")


def run(args) -> int:
    table = render(collect(args.results, args.split), published=not args.no_published)
    if args.out:
        atomic_write_text(os.fspath(args.out), table)
    print(table, end="")
    return 0
