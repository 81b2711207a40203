"""One fact in one place: each fact of the registry issue is written (as code, not as documentation) in exactly one
module, and the registry's entries drive what the commands do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from loraflow.errors import LoraflowError
from loraflow.eval.registry import (
    BENCHMARKS,
    METHODS,
    apply_method,
    lora_paths,
    release_gate_metadata,
    resolve_task,
    static_weights,
)

PACKAGE = Path(__file__).resolve().parents[1] / "loraflow"


def _code_constants(path: Path) -> list:
    """Every constant in a module's code: strings and numbers, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    out = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in docstrings]
    return out + [tuple(e.value for e in node.elts) for node in ast.walk(tree)  # tuples of constants, as tuples
                  if isinstance(node, ast.Tuple) and node.elts and all(isinstance(e, ast.Constant) for e in node.elts)]


def _where(test) -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if any(test(c) for c in _code_constants(p)))


def _defines(name: str) -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name
                         for n in ast.walk(ast.parse(p.read_text()))))


FACTS = {  # fact: (where it lives, a test on one code constant that restates it)
    "the data-root layout": (["data/records.py"], lambda c: isinstance(c, str) and c.endswith("_{split}.jsonl")),
    "the 1.1 gate temperature": (["eval/registry.py"], lambda c: c == 1.1 and isinstance(c, float)),
    "the faithful style's name": (["data/prompts.py"], lambda c: c == "faithful"),
    "training's old name of that style": (["data/prompts.py"], lambda c: c == "llama2-chat"),
    "the method titles": (["eval/registry.py"], lambda c: c == "Fusion: LoRA-Flow"),
    "the opt-in message": (["eval/sandbox/runner.py"], lambda c: isinstance(c, str) and "explicit opt-in" in c),
    "the release's languages": (["eval/registry.py"], lambda c: c == ("zh", "ru", "es") or c == "zh|ru|es"),
}


@pytest.mark.parametrize("fact", list(FACTS))
def test_each_fact_is_written_once(fact):
    where, test = FACTS[fact]
    assert _where(test) == where


@pytest.mark.parametrize("name,where", [
    ("read_predictions", ["eval/predictions.py"]),
    ("versions", ["versions.py"]),
    ("load_english_humaneval", ["eval/humaneval.py"]),
    ("default_temperature", ["eval/registry.py"]),
    ("resolve_temperature", ["eval/registry.py"]),
    ("apply_method", ["eval/registry.py"]),
    ("split_path", ["data/records.py"]),
])
def test_each_function_is_defined_once(name, where):
    assert _defines(name) == where


def test_no_module_lists_the_methods_or_the_tasks_again():
    """The method names as a list, the benchmark table: only the registry has them."""
    methods = tuple(METHODS)
    assert _where(lambda c: isinstance(c, tuple) and len(set(c) & set(methods)) >= 3) == []
    # a benchmark name outside the registry: only as the label of its prompt template (the prompt texts' module)
    assert _where(lambda c: c == "math-dev") == ["data/prompts.py", "eval/registry.py"]
    assert _where(lambda c: c == "code-dev") == ["eval/registry.py"]


def test_benchmark_entries_carry_their_facts():
    mgsm, dev = BENCHMARKS["mgsm"], resolve_task("code", "dev")
    assert (mgsm.kind, mgsm.data_template, mgsm.metrics) == ("test-math", "test/{lang}_math_test.jsonl",
                                                            ("accuracy", "accuracy_strict"))
    assert (dev.name, dev.kind, dev.needs_execution, dev.metric) == ("code-dev", "dev-code", True, "pass@1")
    assert mgsm.score_item("The answer is: 1,234", "1234")["correct"] and mgsm.gold({"answer": "7"}) == "7"


class _Flow:
    k = 2

    def set_mode(self, mode, weights=None, lora=None):
        self.seen = (mode, weights, lora)


@pytest.mark.parametrize("method,roles,expect", [
    ("base", ("lang", "task"), ("base", None, None)),
    ("lang", ("lang", "task"), ("single", None, 0)),
    ("task", ("lang", "task"), ("single", None, 1)),  # the demo's FlowModel holds both LoRAs
    ("task", ("task",), ("single", None, 0)),  # eval loads only the method's own LoRA
    ("average", ("lang", "task"), ("static", [0.5, 0.5], None)),
    ("lorahub", ("lang", "task"), ("static", [0.25, 0.75], None)),
    ("flow", ("lang", "task"), ("flow", None, None)),
])
def test_apply_method_maps_each_method_to_its_fusion_mode(method, roles, expect):
    flow = _Flow()
    apply_method(flow, method, roles=roles, weights=[0.25, 0.75])
    assert flow.seen == expect


def test_method_loras_and_static_weights():
    assert lora_paths("base", "L", "T") == [] and lora_paths("task", "L", "T") == ["T"]
    assert lora_paths("flow", "L", "T") == ["L", "T"]
    assert static_weights("flow", 2) is None and static_weights("average", 4) == [0.25] * 4
    with pytest.raises(LoraflowError, match="needs its searched weights"):
        static_weights("lorahub", 2)
    with pytest.raises(LoraflowError, match="unknown method 'mean'"):
        apply_method(_Flow(), "mean")
    assert release_gate_metadata("ru_code") == {"language": "ru", "task": "code", "lora_names": ["ru_lora",
                                                                                                  "code_lora"]}
    assert release_gate_metadata("fr_math") == {}
