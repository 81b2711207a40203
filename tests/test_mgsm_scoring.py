"""MGSM / math dev answer extraction: the original's faithful chain (SPEC §3) and the strict, comma-safe scorer."""

from __future__ import annotations

import json

import pytest

from loraflow.eval.mgsm import (
    canonical_number,
    extract_faithful,
    extract_strict,
    math_dev_gold,
    score_faithful,
    score_mgsm,
    score_strict,
)

# (generation, faithful extraction, strict extraction)
EXTRACTION_CASES = [
    ("The answer is: 1,234.", "1234", "1234"),
    ("The answer is: 18", "18", "18"),
    ("Janet sells 9 eggs.\n#### 18", "18", "18"),
    ("#### 1,000", "1000", "1000"),
    # `>>` wins over `=`, and is taken before the "last all-digit token" (here 7)
    ("16 - 3 - 4 = <<16-3-4=9>>9 eggs, so she makes 9 * 2 = 18 and 7", "9", "7"),
    ("She makes 9 * 2 = $18.", "18", "18"),
    ("He has 3 apples and 12 pears", "12", "12"),
    ("He has 3 apples and 12.", "3", "12"),  # "12." is not all digits: "3" is the last all-digit token
    # negative and decimal answers: faithful drops the minus and the point, strict keeps them
    ("The answer is: -5", "5", "-5"),
    ("The answer is: 2.5", "25", "2.5"),
    ("The answer is: 3.50", "350", "3.5"),
    ("The answer is: 18.00", "1800", "18"),
    ("x = -7.0", "70", "-7"),
    # the strict scorer knows the translated phrases; the faithful one falls through to later rules
    ("答案是：114,200。", "", "114200"),
    ("Ответ: 2,5", "", "2.5"),
    ("La respuesta es 5\u00a0600.", "5", "5600"),  # a no-break space splits tokens too
    ("Соответственно 5 яблок, ответ 7", "7", "7"),
    # nothing matches
    ("I do not know.", "", None),
    ("", "", None),
    ("a = b", "", None),  # `=` yields the token "b", which has no digit: ""
]


@pytest.mark.parametrize("text,faithful,strict", EXTRACTION_CASES)
def test_extraction(text, faithful, strict):
    assert extract_faithful(text) == faithful
    assert extract_strict(text) == strict


# The four gold answers with thousands separators in the ru and es files (SPEC §3's "comma bug").
COMMA_GOLDS = ["2,125", "114,200", "276,000", "5,600"]


@pytest.mark.parametrize("gold", COMMA_GOLDS)
@pytest.mark.parametrize("template", ["The answer is: {}", "The answer is: {}.", "#### {}", "so the total is {}"])
def test_comma_golds_never_faithful_but_strict(gold, template):
    for written in (gold, gold.replace(",", "")):
        text = template.format(written)
        assert not score_faithful(text, gold)
        assert score_strict(text, gold)


def test_score_mgsm_reports_both():
    assert score_mgsm("The answer is: -3", "-3") == {
        "extracted": "3", "correct": False, "extracted_strict": "-3", "correct_strict": True}
    assert score_mgsm("The answer is: 70000", "70000") == {
        "extracted": "70000", "correct": True, "extracted_strict": "70000", "correct_strict": True}
    assert score_mgsm("no idea", "5")["correct"] is False


@pytest.mark.parametrize("written,canonical", [
    ("18", "18"), ("1,234", "1234"), ("1,234.50", "1234.5"), ("-0", "0"), ("0.50", "0.5"), ("18.", "18"),
    ("\u22123", "-3"), ("12,5", "12.5"), ("1\u202f000", "1000"), ("1,2345", None), ("\\frac{1}{2}", None),
    ("abc", None), ("", None),
])
def test_canonical_number(written, canonical):
    assert canonical_number(written) == canonical


def test_math_dev_gold_prefers_english():
    record = {"original_response": "2 + 1 = 3\nThe answer is: 3", "answer": "2 + 1 = 3\n答案是：4。"}
    assert math_dev_gold(record) == "3"
    assert math_dev_gold({"answer": "…\nLa respuesta es: $-5$."}) == "-5"
    assert math_dev_gold({"answer": "no phrase"}) is None


def test_real_files(loraflow_data):
    """Every MGSM gold is parsed by the strict normaliser; only the comma golds differ from it; the dev golds come
    out numeric for at least 90% of items (the rest are fractions, roots, text)."""
    for lang in ("zh", "ru", "es"):
        rows = [json.loads(line) for line in (loraflow_data / "test" / f"{lang}_math_test.jsonl").open()]
        assert len(rows) == 250
        golds = [r["answer"] for r in rows]
        assert all(canonical_number(g) is not None for g in golds)
        changed = sorted(g for g in golds if canonical_number(g) != g)
        assert changed == ([] if lang == "zh" else sorted(COMMA_GOLDS))
        assert sum(score_faithful(f"The answer is: {g}", g) for g in golds) == 250 - len(changed)
        assert sum(score_strict(f"The answer is: {g}", g) for g in golds) == 250
        dev = [json.loads(line) for line in (loraflow_data / "dev" / f"{lang}_math_dev.jsonl").open()]
        dev_golds = [math_dev_gold(r) for r in dev]
        assert all(dev_golds)
        assert sum(canonical_number(g) is not None for g in dev_golds) >= 90
