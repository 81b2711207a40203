"""Prompt templates of LoRA-Flow: pure functions from strings and records to the exact text the model sees.

Two prompt styles, one name each everywhere (training, evaluation, the dev metric; `STYLES`):
- `faithful` (the original's text; training called it `llama2-chat`, still accepted as an alias). Training:
  `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{input} [/INST]` + response + ` </s>`.
  The prompt text carries the BOS as `<s>`, so it must be tokenised with `add_special_tokens=False`.
- `chat-template`: the tokenizer's own `apply_chat_template` (system + user, generation prompt) + response + eos;
  for base models whose chat format is not Llama-2's.

Evaluation (SPEC §3): one template per (task, split) in `EVAL_TEMPLATES`, filled from the record, the language's
system prompt (math: `EVAL_SYSTEM_PROMPTS` where the original hard-coded another text than system_prompts.json,
i.e. ru) or the language's instruction (code). The texts follow the original UltraEval transforms
character for character, including three details SPEC §3 leaves out: the HumanEval prompt is `.strip()`-ed
before its 4-space indents become tabs, the MBPP prompt is wrapped in literal `\"\"\"` quotes, and the Russian
MBPP instruction has no final period while the Russian HumanEval one has (giving `задачи.:`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from loraflow.errors import LoraflowError

FAITHFUL, CHAT_TEMPLATE = "faithful", "chat-template"
STYLES = (FAITHFUL, CHAT_TEMPLATE)
STYLE_ALIASES = {"llama2-chat": FAITHFUL}  # the training side's old name of the faithful style (one release)
LLAMA2_PROMPT = "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{input} [/INST]"
LLAMA2_EOS = " </s>"
# The original appended this ("Let's think step by step.") after `[/INST]` of every training prompt, for every
# language and task, although no evaluation prompt has it. The recipe (`TrainConfig.cot_suffix`) adds it by default;
# `--no-cot-suffix` drops it.
COT_SUFFIX = "让我们一步一步地思考。"

# System prompts loraflow adds for languages the release has none for; `system_prompts.json` always wins.
# en_math mirrors the structure of the release's zh/ru/es math prompts; en_code matches the code instruction.
DEFAULT_SYSTEM_PROMPTS = {
    "en_math": "You are an English AI assistant, and your responsibility is to help users solve their problems. "
               "When answering questions, so that English-speaking users can better understand your answers, you "
               "may only answer in English. Try to make your answers as helpful and readable as possible, and do "
               "not output any harmful content.",
    "en_code": "Create a Python script for this problem",
}


def system_prompt(system_prompts: Mapping[str, str], lang: str, task: str) -> str:
    """The system prompt for `{lang}_{task}`: from `system_prompts` (the release's file), else loraflow's default."""
    key = f"{lang}_{task}"
    if key in system_prompts:
        return system_prompts[key]
    if key in DEFAULT_SYSTEM_PROMPTS:
        return DEFAULT_SYSTEM_PROMPTS[key]
    have = sorted(set(system_prompts) | set(DEFAULT_SYSTEM_PROMPTS))
    raise LoraflowError(f"no system prompt for {key!r} (have: {', '.join(have)}); add one to system_prompts.json")


def canonical_style(style: str) -> str:
    """The one name of a prompt style (`llama2-chat` -> `faithful`); an unknown style is an error."""
    style = STYLE_ALIASES.get(style, style)
    if style not in STYLES:
        raise LoraflowError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    return style


def chat_prompt(tokenizer, system: str | None, user: str) -> str:
    """The tokenizer's chat template applied to (system, user) with the assistant's generation prompt, as text."""
    from jinja2.exceptions import TemplateError

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (ValueError, TemplateError) as e:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise LoraflowError(f"the chat template of tokenizer {name!r} failed: {e} "
                            "(use style 'faithful', or a tokenizer whose template accepts a system message)") from e


def training_texts(system: str, input_text: str, output_text: str, *, style: str = FAITHFUL,
                   tokenizer=None, cot_suffix: bool = False) -> tuple[str, str]:
    """`(prompt, response)` texts of one training example; the loss goes on the response (which ends with eos).

    `style="chat-template"` needs `tokenizer`. `cot_suffix=True` appends `COT_SUFFIX` to the prompt, as the
    original did (faithful mode only).
    """
    if canonical_style(style) == FAITHFUL:
        prompt, eos = LLAMA2_PROMPT.format(system=system, input=input_text), LLAMA2_EOS
    else:
        if tokenizer is None or tokenizer.eos_token is None:
            raise LoraflowError("style 'chat-template' needs a tokenizer with a chat template and an eos token")
        prompt, eos = chat_prompt(tokenizer, system, input_text), tokenizer.eos_token
    return prompt + (COT_SUFFIX if cot_suffix else ""), output_text + eos


# ---- evaluation -------------------------------------------------------------------------------------------------

MGSM_PROMPT = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question} [/INST]"
# Evaluation system prompts the original hard-coded in its prompt builders where they differ from
# system_prompts.json (which training uses). Only ru math differs: "ответственность - помогать" (with " -"), for
# the test and the dev set alike (SPEC §3). zh and es math use system_prompts.json's text, which equals theirs.
EVAL_SYSTEM_PROMPTS = {
    "ru_math": "Ты являешься русским ассистентом искусственного интеллекта, твоя ответственность - помогать "
               "пользователям решать их проблемы. При отвечании на вопросы, для того, чтобы русскоязычные "
               "пользователи лучше понимали твои ответы, ты можешь использовать только русский язык. Старайся, "
               "чтобы твои ответы были максимально полезными и читаемыми, и не допускай публикации вредоносного "
               "контента. Пожалуйста, не используй английский язык для ответа.",
}
CODE_INSTRUCTIONS = {  # the zh/ru/es texts are the release's `{lang}_code` system prompts
    "zh": "为这个问题创建一个Python脚本",
    "ru": "Создайте Python скрипт для этой задачи.",
    "es": "Crear un script de Python para este problema",
    "en": "Create a Python script for this problem",
}


@dataclass(frozen=True)
class EvalTemplate:
    """One evaluation prompt: `text` is filled with `fields(record)` plus `system` or `instruction`."""

    name: str
    text: str
    fields: Callable[[dict], dict]
    instructions: Mapping[str, str] | None = None  # per language (code); None: uses the `{lang}_{task}` system prompt


EVAL_TEMPLATES: dict[tuple[str, str], EvalTemplate] = {  # (task, split) -> template
    ("math", "test"): EvalTemplate("mgsm", MGSM_PROMPT, lambda r: {"question": r["question"]}),
    ("math", "dev"): EvalTemplate("math-dev", MGSM_PROMPT, lambda r: {"question": r["question"]}),
    ("code", "test"): EvalTemplate(
        "humaneval", "[INST]{instruction}:\n{prompt}\n\n[/INST]",
        lambda r: {"prompt": r["prompt"].strip().replace("    ", "\t")}, CODE_INSTRUCTIONS),
    ("code", "dev"): EvalTemplate(
        "mbpp", '"""[INST]{instruction}: {text}[/INST]\n{tests}"""',
        lambda r: {"text": r["text"], "tests": "\n".join(r["test_list"])},
        {**CODE_INSTRUCTIONS, "ru": "Создайте Python скрипт для этой задачи"}),
}


def eval_prompt(record: dict, task: str, split: str, lang: str, *, system_prompts: Mapping[str, str] | None = None,
                system: str | None = None, instruction: str | None = None) -> str:
    """The original evaluation prompt for one `record` of `{lang}_{task}_{split}` (no BOS text: the tokenizer adds it).

    Math needs the system prompt: `system`, else the original's hard-coded evaluation prompt
    (`EVAL_SYSTEM_PROMPTS`, ru), else looked up in `system_prompts` (see `system_prompt`). Code uses
    `instruction`, else the template's instruction for `lang`.
    """
    template = EVAL_TEMPLATES.get((task, split))
    if template is None:
        raise LoraflowError(f"no evaluation prompt for task {task!r} split {split!r}; "
                            f"have: {', '.join(f'{t}/{s}' for t, s in EVAL_TEMPLATES)}")
    try:
        fields = template.fields(record)
    except KeyError as e:
        raise LoraflowError(f"a {template.name} prompt needs field {e} in the record") from None
    if template.instructions is None:
        fields["system"] = (system if system is not None else EVAL_SYSTEM_PROMPTS.get(f"{lang}_{task}")
                            or system_prompt(system_prompts or {}, lang, task))
    else:
        if instruction is None and lang not in template.instructions:
            raise LoraflowError(f"no {template.name} instruction for language {lang!r} "
                                f"(have: {', '.join(template.instructions)}); pass instruction=...")
        fields["instruction"] = instruction if instruction is not None else template.instructions[lang]
    return template.text.format(**fields)
