"""The package's import graph: no cycles, and no import that runs upward (DESIGN.md: data flows one way).

Every `import` / `from ... import` in every module counts, the ones inside functions too: a lazy import is still a
dependency, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loraflow"

# Who may import whom, by layer. A module may import its own layer and the layers below it, never one above.
# The fusion core and the scorers sit low: they never import training, evaluation runs, the demo or commands.
LAYERS = [
    ("base", ("loraflow", "loraflow.errors", "loraflow.files", "loraflow.versions", "loraflow.devices")),
    ("tables", ("loraflow.convert.tables", "loraflow.data.prompts")),
    ("core", ("loraflow.fusion", "loraflow.data.records", "loraflow.eval.mgsm", "loraflow.eval.humaneval",
              "loraflow.eval.sandbox", "loraflow.convert.shards", "loraflow.convert.gguf", "loraflow.bases")),
    ("library", ("loraflow.tiny", "loraflow.eval", "loraflow.train", "loraflow.convert", "loraflow.data",
                 "loraflow.plots", "loraflow.launch", "loraflow.vllm", "loraflow.gpu_check",
                 "loraflow.lmeval")),
    ("bench", ("loraflow.bench", "loraflow.demo", "loraflow.vllm.bench")),
    ("cli", ("loraflow.cli", "loraflow.export")),
]
SCORERS = ("loraflow.eval.mgsm", "loraflow.eval.humaneval", "loraflow.eval.sandbox", "loraflow.eval.score")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The loraflow modules `path` imports (absolute names; `from pkg import sub` counts as pkg.sub when sub is a
    module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    return {m for m in found if m == "loraflow" or m.startswith("loraflow.")}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(path) if m in known and m != name} for name, path in known.items()}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module}: not in any layer of LAYERS (add it where it belongs)"
    return rank


def test_the_import_graph_has_no_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_no_import_runs_upward():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, deps in graph().items() for b in deps
              if layer_of(b) > layer_of(a) and not (a == "loraflow" and b in _LAZY_EXPORTS)]
    assert not upward, "\n".join(upward)


def test_scorers_never_import_the_model_training_or_commands():
    bad = [f"{a} imports {b}" for a, deps in graph().items() if a.startswith(SCORERS) for b in deps
           if b.startswith(("loraflow.fusion", "loraflow.train", "loraflow.eval.run", "loraflow.cli", "loraflow.demo",
                            "loraflow.bench"))]
    assert not bad, "\n".join(bad)


def test_no_module_calls_another_commands_run():
    """Commands are thin wrappers: library code never calls a command module's `run(args)`."""
    calls = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loraflow")
                    and any(a.name == "run" for a in node.names)):
                calls.append(f"{name} imports run from {node.module}")
    assert not calls, "\n".join(calls)


def _command_modules() -> set[str]:
    from loraflow.cli import COMMANDS

    return {module for module, _ in COMMANDS.values()}


def _bound_modules(tree: ast.AST) -> dict[str, str]:
    """Local name -> loraflow module, for `import loraflow.x as y` and `from loraflow.pkg import mod [as y]`."""
    known, bound = modules(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in known:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraflow"):
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    bound[a.asname or a.name] = f"{node.module}.{a.name}"
    return bound


def namespace_and_run_calls(sources: dict[str, Path]) -> list[str]:
    """Where `sources` (module name -> file) build an argparse.Namespace or call a command module's `run()`."""
    commands, bad = _command_modules(), []
    for name, path in sources.items():
        tree = ast.parse(path.read_text())
        bound = _bound_modules(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "Namespace") or \
                    (isinstance(func, ast.Name) and func.id == "Namespace"):
                bad.append(f"{name}:{node.lineno} builds an argparse.Namespace")
            if isinstance(func, ast.Attribute) and func.attr == "run" and isinstance(func.value, ast.Name):
                target = bound.get(func.value.id)
                if target in commands and target != name:
                    bad.append(f"{name}:{node.lineno} calls {target}.run()")
    return bad


def test_library_code_builds_no_namespace_and_calls_no_command():
    """No argparse.Namespace is made outside a parser (library code takes typed arguments), and no module calls
    another command module's `run(args)` (commands are thin wrappers over library functions)."""
    bad = namespace_and_run_calls(modules())
    assert not bad, "\n".join(bad)


def test_the_scan_catches_what_it_looks_for(tmp_path):
    """The same scan on a planted module (so a scan that finds nothing is not vacuous)."""
    planted = tmp_path / "planted.py"
    planted.write_text("import argparse\nfrom loraflow.eval import score as scoring\n\n\ndef f():\n"
                       "    scoring.run(argparse.Namespace(task='mgsm'))\n")
    bad = namespace_and_run_calls({"loraflow.planted": planted})
    assert sorted(bad) == ["loraflow.planted:6 builds an argparse.Namespace",
                           "loraflow.planted:6 calls loraflow.eval.score.run()"]


# loraflow/__init__.py names its lazy exports as strings, not imports; they are not edges of the graph
_LAZY_EXPORTS: set[str] = set()
