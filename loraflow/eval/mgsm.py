"""Answer extraction and scoring for MGSM and the math dev set: the original's faithful rule and a strict one.

**Faithful** (`extract_faithful`, SPEC §3), keeps numbers comparable with the paper. The first rule that yields a
token wins; then every character but the ASCII digits 0-9 is removed (so "-5" becomes "5" and "2.5" becomes "25");
the score is exact string equality with the gold answer string. A "token" is a run of non-whitespace characters.

| rule | the token it yields |
|---|---|
| `The answer is: (-?[0-9.,]+)` | the group of the first match |
| `#### (-?[0-9.,]+)` | the group of the first match |
| `>>` | the first token after the last `>>` (GSM8K calculator annotations `<<2*3=6>>6`) |
| `=` | the first token after the last `=` |
| last all-digit token | the last token made of ASCII digits only |
| none | nothing: the extraction is "" and never correct |

Known consequence (the "comma bug"): gold answers written with thousands separators ("2,125", "114,200",
"276,000", "5,600" in the ru and es files) never equal a digits-only extraction, and negative or decimal golds
never match either.

**Strict** (`extract_strict`) parses numbers on both sides and compares canonical strings: thousands separators
(`,` in groups of three, no-break and narrow spaces) are dropped, `,` followed by one or two final digits is a
decimal comma (ru, es), trailing zeros of a decimal and a trailing period go, a leading minus (also U+2212) stays.
It prefers an answer phrase from `ANSWER_PHRASES` (first occurrence), then `####`, then the last number in the text.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

FAITHFUL_ANSWER = re.compile(r"The answer is: (-?[0-9.,]+)")
FAITHFUL_HASHES = re.compile(r"#### (-?[0-9.,]+)")
ALL_DIGITS = re.compile(r"[0-9]+")
NON_DIGIT = re.compile(r"[^0-9]")


def _first_group(pattern: re.Pattern) -> callable:
    def rule(text: str) -> str | None:
        m = pattern.search(text)
        return m.group(1) if m else None

    return rule


def _token_after_last(sep: str) -> callable:
    def rule(text: str) -> str | None:
        if sep not in text:
            return None
        tokens = text.rsplit(sep, 1)[1].split()
        return tokens[0] if tokens else None

    return rule


def _last_all_digit_token(text: str) -> str | None:
    return next((tok for tok in reversed(text.split()) if ALL_DIGITS.fullmatch(tok)), None)


# (name, rule): the faithful chain, in order; a rule returns its token or None.
FAITHFUL_RULES = (
    ("answer-is", _first_group(FAITHFUL_ANSWER)),
    ("hashes", _first_group(FAITHFUL_HASHES)),
    ("after->>", _token_after_last(">>")),
    ("after-=", _token_after_last("=")),
    ("last-digits", _last_all_digit_token),
)


def extract_faithful(text: str) -> str:
    """The original harness's answer: the first rule's token with every non-digit removed; "" when none matches."""
    for _, rule in FAITHFUL_RULES:
        token = rule(text)
        if token:
            return NON_DIGIT.sub("", token)
    return ""


def score_faithful(text: str, gold: str) -> bool:
    """Exact string match of the faithful extraction with the gold answer string, as in the paper."""
    return extract_faithful(text) == str(gold).strip()


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


def score_mgsm(text: str, gold: str) -> dict:
    """Both scorers side by side: `extracted`, `correct` (faithful) and `extracted_strict`, `correct_strict`."""
    extracted, strict, want = extract_faithful(text), extract_strict(text), canonical_number(gold)
    return {"extracted": extracted, "correct": extracted == str(gold).strip(),
            "extracted_strict": strict, "correct_strict": want is not None and strict == want}


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
