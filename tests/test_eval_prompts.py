"""The evaluation prompts of SPEC §3, pinned character for character on the first real record of every language
and benchmark: the system prompts and instructions are written out here as the original's prompt builders
(UltraEval/datasets/*/transform_gen_{lang}.py) hard-code them."""

from __future__ import annotations

import pytest

from loraflow.data.records import load_split
from loraflow.eval.registry import build_prompt, load_system_prompts, resolve_task

MATH_SYSTEM = {
    "zh": "你是中文人工智能助手，你的职责是帮助用户解决他们的问题。回答问题时，"
          "为了让中文用户更好地理解你的回答，你只能使用中文作答。"
          "答案尽量具有较高帮助性、可读性，并且不要输出有害内容。请注意一定不要使用英文作答。",
    # not system_prompts.json's ru_math: the original's ru builder has "ответственность - помогать"
    "ru": "Ты являешься русским ассистентом искусственного интеллекта, твоя ответственность - помогать пользователям "
          "решать их проблемы. При отвечании на вопросы, для того, чтобы русскоязычные пользователи лучше понимали "
          "твои ответы, ты можешь использовать только русский язык. Старайся, чтобы твои ответы были максимально "
          "полезными и читаемыми, и не допускай публикации вредоносного контента. Пожалуйста, не используй "
          "английский язык для ответа.",
    "es": "Eres un asistente de inteligencia artificial en español, y tu responsabilidad es ayudar a los usuarios a "
          "resolver sus problemas. Cuando respondas a las preguntas, para que los usuarios que hablan español puedan "
          "entender mejor tus respuestas, solo puedes usar español para contestar. Intenta que tus respuestas sean lo "
          "más útiles y comprensibles posible, y no envíes ningún contenido dañino. Por favor, no uses inglés para "
          "contestar.",
}
HUMANEVAL_INSTRUCTION = {"zh": "为这个问题创建一个Python脚本", "ru": "Создайте Python скрипт для этой задачи.",
                         "es": "Crear un script de Python para este problema"}
MBPP_INSTRUCTION = {"zh": "为这个问题创建一个Python脚本", "ru": "Создайте Python скрипт для этой задачи",
                    "es": "Crear un script de Python para este problema"}


def expected(benchmark: str, lang: str, r: dict) -> str:
    if benchmark in ("mgsm", "math-dev"):
        return f"[INST] <<SYS>>\n{MATH_SYSTEM[lang]}\n<</SYS>>\n\n{r['question']} [/INST]"
    if benchmark == "humaneval":
        code = r["prompt"].strip().replace("    ", "\t")
        return f"[INST]{HUMANEVAL_INSTRUCTION[lang]}:\n{code}\n\n[/INST]"
    tests = "\n".join(r["test_list"])
    return f'"""[INST]{MBPP_INSTRUCTION[lang]}: {r["text"]}[/INST]\n{tests}"""'


@pytest.mark.parametrize("benchmark", ["mgsm", "math-dev", "humaneval", "code-dev"])
@pytest.mark.parametrize("lang", ["zh", "ru", "es"])
def test_the_first_record_prompt_is_the_originals(loraflow_data, lang, benchmark):
    task = resolve_task(benchmark)
    record = load_split(loraflow_data, lang, task.domain, task.split)[0]
    prompt = build_prompt(task, record, lang, "faithful", load_system_prompts(loraflow_data))
    assert prompt == expected(benchmark, lang, record)


def test_training_keeps_the_system_prompts_file(loraflow_data):
    """The ru math system prompt of system_prompts.json (training) is not the evaluation one (no " -")."""
    from loraflow.data.prompts import system_prompt

    trained = system_prompt(load_system_prompts(loraflow_data), "ru", "math")
    assert trained != MATH_SYSTEM["ru"] and trained.replace("ответственность помогать",
                                                           "ответственность - помогать") == MATH_SYSTEM["ru"]
