"""Answer extraction and scoring for MGSM and the math dev set: the original's faithful rule and a strict one.

**Faithful** (`extract_faithful` = the original's `GSM8KZeroPost`, SPEC §3). A "token" is a run of non-whitespace
characters (Python's `str.split()`, which also splits at no-break spaces). The first rule that applies gives the
answer:

| step | when | the answer |
|---|---|---|
| 1 | `The answer is: (-?[0-9.,]+)` matches | its first match's group, stripped, commas removed, then step 7 |
| 2 | `#### (-?[0-9.,]+)` matches | the same |
| 3 | a token follows the last `>>` | that token, `$` stripped at both ends, commas and final periods out, step 7 |
| 4 | a token follows the last `=` | the same |
| 5 | some token is `str.isdigit()` | the last such token, **unchanged** (isdigit is Unicode-aware: "²", "８", "٣٤") |
| 6 | otherwise | the **first** token (the loop variable of step 5 is left holding it), step 7; "" for a blank text |
| 7 | every path but 5 | every character but the ASCII digits 0-9 removed (so "-5" gives "5" and "2.5" gives "25") |

The gold (`faithful_gold` = the original's `GSM8KPost`): steps 2, 3, 4 (without step 7), else the last isdigit
token, else the first token, stripped. For every MGSM gold that is the gold string itself; for a math dev item it
is applied to the **whole** worked answer. Score = exact string equality of the two.

Known consequences: gold answers written with thousands separators ("2,125", "114,200", "276,000", "5,600" in the
ru and es files) never equal an extraction (the "comma bug"); negative and decimal golds never match either; a math
dev gold that is not a bare number (a fraction, a root, a word) is never matched.

**Strict** (`extract_strict`, `canonical_number`) parses numbers on both sides and compares canonical strings:
thousands separators (`,` in groups of three, no-break and narrow spaces) are dropped, `,` followed by one or two
final digits is a decimal comma (ru, es), trailing zeros of a decimal and a trailing period go, a leading minus
(also U+2212) stays. It prefers an answer phrase from `ANSWER_PHRASES` (first occurrence; zh, ru, es and en), then
`####`, then the last number in the text. The strict math dev gold (`math_dev_gold`) is the number after the last
"The answer is:" of the English response.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

FAITHFUL_ANSWER = re.compile(r"The answer is: (-?[0-9.,]+)")
FAITHFUL_HASHES = re.compile(r"#### (-?[0-9.,]+)")
NON_DIGIT = re.compile(r"[^0-9]")  # ASCII digits only: Python's [0-9] is not Unicode-aware


def _group(pattern: re.Pattern, text: str) -> str | None:
    """Steps 1-2: the group of the first match, stripped, commas removed."""
    m = pattern.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def _after_last(sep: str, text: str) -> str | None:
    """Steps 3-4: the first token after the last `sep`, `$` stripped, commas and trailing periods removed."""
    if sep not in text:
        return None
    tokens = text[text.rfind(sep) + len(sep):].split()
    return tokens[0].strip("$").replace(",", "").rstrip(".") if tokens else None


def _last_isdigit(text: str) -> str | None:
    """Step 5: the last token for which `str.isdigit()` holds (Unicode digits included), as it is."""
    return next((tok for tok in reversed(text.split()) if tok.isdigit()), None)


def _first_token(text: str) -> str:
    """Step 6: what the original's `for text in reversed(text.split())` leaves in `text` when no token is all
    digits: the first token; the text itself when it has no token."""
    tokens = text.split()
    return tokens[0] if tokens else text


def extract_faithful(text: str) -> str:
    """The original harness's answer (`GSM8KZeroPost`), steps 1-7 of the module docstring."""
    for rule in (lambda t: _group(FAITHFUL_ANSWER, t), lambda t: _group(FAITHFUL_HASHES, t),
                 lambda t: _after_last(">>", t), lambda t: _after_last("=", t)):
        token = rule(text)
        if token is not None:
            return NON_DIGIT.sub("", token).strip()
    digits = _last_isdigit(text)
    if digits is not None:
        return digits  # step 5 skips step 7
    return NON_DIGIT.sub("", _first_token(text)).strip()


def faithful_gold(answer: str) -> str:
    """The original's gold (`GSM8KPost`): `####`, `>>`, `=` (steps 2-4, no digit filter), else the last isdigit
    token, else the first token, stripped."""
    answer = str(answer)
    for rule in (lambda t: _group(FAITHFUL_HASHES, t), lambda t: _after_last(">>", t),
                 lambda t: _after_last("=", t), _last_isdigit):
        token = rule(answer)
        if token is not None:
            return token.strip()
    return _first_token(answer).strip()


def score_faithful(text: str, gold: str) -> bool:
    """Exact string match of the faithful extraction with the faithful gold, as in the paper."""
    return extract_faithful(text) == faithful_gold(gold)


# A number as written: optional minus; digits with thousands groups or plain; optional decimal part.
_SEP = "[,\u00a0\u202f]"
NUMBER = (rf"[-\u2212]?(?:\d{{1,3}}(?:{_SEP}\d{{3}})+(?![\d])|\d+)"
          r"(?:\.\d+|,\d{1,2}(?![\d,]))?|[-\u2212]?\.\d+")
NUMBER_RE = re.compile(NUMBER)

# Regexes of the phrases that introduce the final answer, per language (the task LoRA answers in English; the
# language LoRAs in the target language). Case-insensitive; whole words where the script has them ("ответ" must not
# match inside "соответственно"); an optional colon, `$` and `\boxed{` may follow.
ANSWER_PHRASES = {
    "en": r"\bthe answer is\b",
    "zh": r"答案是",
    "ru": r"\bответ\b",
    "es": r"\bla respuesta es\b",
}
_PHRASE = "(?:" + "|".join(ANSWER_PHRASES.values()) + ")"
_ANSWER_RE = re.compile(_PHRASE + r"\s*[:：]?\s*\$?\s*(?:\\boxed\{)?\s*(" + NUMBER + ")", re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*\$?\s*(" + NUMBER + ")")


def canonical_number(text: str) -> str | None:
    """The canonical string of a number written as `text` ("1,234." -> "1234", "-3.50" -> "-3.5"), else None."""
    s = str(text).strip().rstrip(".").replace("\u2212", "-")
    if not NUMBER_RE.fullmatch(s):
        return None
    if re.search(r",\d{1,2}$", s) and not re.search(r",\d{3}", s):
        s = s.replace(",", ".")  # decimal comma
    s = re.sub(_SEP, "", s)
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_strict(text: str) -> str | None:
    """The canonical answer: an answer phrase's number, else `####`'s, else the text's last number; else None."""
    for pattern in (_ANSWER_RE, _HASHES_RE):
        m = pattern.search(text)
        if m:
            return canonical_number(m.group(1))
    numbers = NUMBER_RE.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def score_strict(text: str, gold: str) -> bool:
    """Numeric comparison of canonical strings; a gold that is not a number is never matched."""
    want = canonical_number(gold)
    return want is not None and extract_strict(text) == want


def score_mgsm(text: str, gold: str, *, strict_text: str | None = None, strict_gold: str | None = None) -> dict:
    """Both scorers side by side: `extracted`, `gold`, `correct` (faithful: `text` against `faithful_gold(gold)`)
    and `extracted_strict`, `gold_strict`, `correct_strict` (`strict_text`, default `text`, against
    `strict_gold`, default `gold`, compared as canonical numbers)."""
    strict_text = text if strict_text is None else strict_text
    strict_gold = gold if strict_gold is None else strict_gold
    extracted, want = extract_faithful(text), faithful_gold(gold)
    strict, want_strict = extract_strict(strict_text), canonical_number(strict_gold)
    return {"extracted": extracted, "gold": want, "correct": extracted == want,
            "extracted_strict": strict, "gold_strict": want_strict,
            "correct_strict": want_strict is not None and strict == want_strict}


# Where the gold answer of a math dev item is: (field, the phrase before it). English first: it is never translated.
DEV_GOLD_SOURCES = (
    ("original_response", re.compile(r"The answer is:[ \t]*([^\n]*)")),
    ("answer", re.compile(_PHRASE + r"[ \t]*[:：]?[ \t]*([^\n]*)", re.IGNORECASE)),
)


def math_dev_gold(record: dict) -> str | None:
    """The gold answer of a math dev item: the rest of the line after the last "The answer is:" of the English
    `original_response` (else after the last answer phrase of the translated `answer`), without `$` and a final
    period. Returned as written ("3", "-5", "\\frac{5}{324}"); `canonical_number` of it is None for non-numbers.
    """
    for field, pattern in DEV_GOLD_SOURCES:
        text = record.get(field)
        matches = pattern.findall(text) if isinstance(text, str) else []
        answer = matches[-1].strip().rstrip("。.").strip().strip("$").strip() if matches else ""
        if answer:
            return answer
    return None
