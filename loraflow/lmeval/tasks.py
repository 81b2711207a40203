"""Local lm-eval tasks with loraflow's benchmarks: MGSM with `loraflow eval`'s prompts, decoding and scorers.

  loraflow lm-eval-task mgsm --language zh --data-root data --out-dir tasks/ [--limit N] [--prompt-style faithful]
  loraflow lm-eval --model loraflow --model_args folder=OUT --include_path tasks/ --tasks loraflow_mgsm_zh

writes `OUT_DIR/loraflow_mgsm_{lang}.yaml` and `OUT_DIR/loraflow_mgsm_{lang}.jsonl` (one `{id, prompt, answer}` a
line):
- the prompts are `loraflow eval`'s (`registry.build_prompt`, the data root's system prompts), so lm-eval's
  context is the prompt itself (`doc_to_text: "{{prompt}}"`, zero-shot);
- decoding is the benchmark's: greedy, at most its `max_new_tokens` (512) and its stop strings (none: EOS only);
- the metrics are `loraflow score`'s (`process_mgsm_results`, `loraflow.eval.mgsm.score_mgsm`): `accuracy` (the
  original's faithful extraction and gold) and `accuracy_strict`, each the mean over items.

`loraflow score` reads the faithful answer from `generation_original` (the prompt and the answer decoded together,
the prompt cut off), lm-eval hands the metric the continuation decoded alone (`generation`). The extraction ignores
leading and trailing whitespace, so the two agree unless a tokenizer decodes a token differently across the prompt
boundary or the decoded prompt is not the prompt text (then the original kept the whole text).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from loraflow.data.prompts import STYLES
from loraflow.errors import LoraflowError
from loraflow.eval.registry import (
    BENCHMARKS,
    FAITHFUL,
    build_prompt,
    canonical_style,
    load_records,
    load_system_prompts,
)
from loraflow.files import atomic_write_text

TASKS = ("mgsm",)  # the benchmarks that have an lm-eval task here (generation scored by answer extraction)


def task_name(benchmark: str, language: str) -> str:
    return f"loraflow_{benchmark}_{language}"


def process_mgsm_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's `process_results` hook: both of `loraflow score`'s verdicts on one generation."""
    from loraflow.eval.mgsm import score_mgsm

    verdict = score_mgsm(results[0], str(doc["answer"]))
    return {"accuracy": float(verdict["correct"]), "accuracy_strict": float(verdict["correct_strict"])}


def _yaml(name: str, data_file: Path, max_new_tokens: int, stop: tuple[str, ...], source: dict) -> str:
    """The task's YAML. JSON strings are YAML strings, so every value is written with json.dumps."""
    q = json.dumps
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("accuracy", "accuracy_strict"))
    return (f"# written by `loraflow lm-eval-task`: {q(source, ensure_ascii=False)}\n"
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {q(str(data_file))}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            "doc_to_text: \"{{prompt}}\"\n"
            "doc_to_target: \"{{answer}}\"\n"
            "num_fewshot: 0\n"
            f"generation_kwargs:\n  until: {q(list(stop))}\n  max_gen_toks: {max_new_tokens}\n"
            "  do_sample: false\n  temperature: 0.0\n"
            "process_results: !function loraflow.lmeval.tasks.process_mgsm_results\n"
            f"metric_list:\n{metrics}"
            "metadata:\n  version: 1.0\n")


def write_task(benchmark: str, language: str, data_root: str | os.PathLike, out: str | os.PathLike, *,
               limit: int | None = None, prompt_style: str = FAITHFUL, tokenizer: str | None = None,
               max_new_tokens: int | None = None, overwrite: bool = False) -> Path:
    """Write the lm-eval task of `benchmark` in `language` (YAML + JSONL) into folder `out`; returns the YAML.

    tokenizer: a base model folder or hub id whose chat template the `chat-template` prompt style uses.
    max_new_tokens: default the benchmark's (as `loraflow eval --max-new-tokens`)."""
    if benchmark not in TASKS:
        raise LoraflowError(f"no lm-eval task for {benchmark!r}; there is one for {', '.join(TASKS)}")
    for flag, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise LoraflowError(f"{flag} must be at least 1, got {value}")
    task = BENCHMARKS[benchmark]
    style = canonical_style(prompt_style)
    tok = None
    if tokenizer is not None:
        from loraflow.bases import load_base_tokenizer

        tok = load_base_tokenizer(tokenizer)
    records, source = load_records(task, language, data_root)
    records = records[:limit] if limit else records
    system_prompts = load_system_prompts(data_root)
    rows = [{"id": str(r["id"]), "prompt": build_prompt(task, r, language, style, system_prompts, tok),
             "answer": str(r.get("answer", ""))} for r in records]
    out = Path(out)
    name = task_name(benchmark, language)
    yaml_path, data_path = out / f"{name}.yaml", out / f"{name}.jsonl"
    for path in (yaml_path, data_path):
        if path.exists() and not overwrite:
            raise LoraflowError(f"{path} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    max_new_tokens = max_new_tokens or task.max_new_tokens
    meta = {"benchmark": benchmark, "language": language, "data": source, "prompt_style": style, "limit": limit,
            "items": len(rows), "max_new_tokens": max_new_tokens}
    atomic_write_text(yaml_path, _yaml(name, data_path.resolve(), max_new_tokens, task.stop, meta))
    return yaml_path


# --------------------------------------------------------------------------------- `loraflow lm-eval-task`

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=("mgsm",), help="the benchmark (mgsm)")
    p.add_argument("--language", required=True, help="zh, ru, es, ... (MGSM's languages)")
    p.add_argument("--data-root", default="data", help="as `loraflow eval --data-root`: holds test/ and "
                                                       "system_prompts.json (MGSM's TSV beside it in mgsm/)")
    p.add_argument("--out-dir", required=True, help="the folder for the task's YAML and JSONL (lm-eval --include_path)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--max-new-tokens", type=int, help="default: the benchmark's (512), as `loraflow eval`")
    p.add_argument("--prompt-style", choices=STYLES, default=STYLES[0],
                   help="faithful: the original [INST] prompts; chat-template: --tokenizer's chat template")
    p.add_argument("--tokenizer", help="chat-template style: the base model (folder or hub id) whose template to use")
    p.add_argument("--overwrite", action="store_true", help="replace the task's files if they exist")


def run(args: argparse.Namespace) -> int:
    path = write_task(args.benchmark, args.language, args.data_root, args.out_dir, limit=args.limit,
                      prompt_style=args.prompt_style, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
                      overwrite=args.overwrite)
    print(f"{path}  (lm-eval: --include_path {path.parent} --tasks {task_name(args.benchmark, args.language)})")
    return 0
