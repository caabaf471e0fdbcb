"""Numeric answers (SVAMP, GSM8K): extraction from free text, canonical form, tolerant comparison.

Extraction: of the last "answer is ..." / "Answer: ...", the last "#### ..." and the last \\boxed{...}, the one
nearest the end of the text gives the answer (the first number after it, up to the end of that sentence or line); if
none holds a number, the last number anywhere in the text.
Numbers may carry thousands commas, a leading "$", a trailing "%" or unit, a trailing period, a sign,
decimals, a/b fractions and LaTeX \\frac{a}{b}.
"""

from __future__ import annotations

import re
from fractions import Fraction

from undo_jax.tasks.latex import last_boxed_content

# Relative tolerance when comparing numbers (and absolute below magnitude 1).
REL_TOL = 1e-6

_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
# A sign counts only when not glued to a preceding word, digit or bracket (so "5-3" has no "-3").
_NUMBER = re.compile(
    r"(?<![\w.)\]}])(?P<sign>-)?\$?\s?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?)(?![\d,]))?"
)
_SENTENCE_END = re.compile(r"\.\s|\n")
_ANSWER_IS = re.compile(r"answer\s+is\b|answer\s*:", re.IGNORECASE)


def _clean(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-")  # unicode minus / en dash
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\$", "$").replace("\\%", "%")
    return _LATEX_FRAC.sub(r"\1/\2", text)


def _numbers(text: str) -> list[Fraction]:
    values = []
    for m in _NUMBER.finditer(_clean(text)):
        value = Fraction(m["num"].replace(",", ""))
        if m["den"] is not None:
            den = Fraction(m["den"])
            if den == 0:
                continue
            value /= den
        values.append(-value if m["sign"] else value)
    return values


def parse_number(text: str | None) -> Fraction | None:
    """The first number in `text` (exact), or None."""
    if text is None:
        return None
    values = _numbers(text)
    return values[0] if values else None


def format_number(value: Fraction) -> str:
    """Canonical text: an integer as digits, otherwise a decimal with at most 9 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".9g")


def extract_number(text: str) -> str | None:
    """The final numeric answer in `text`, in canonical form, or None if it has no number at all."""
    if not text:
        return None
    # (position, segment) of the last "answer is", "####" and \boxed{}; the marker nearest the end wins.
    candidates = []
    answer_is = list(_ANSWER_IS.finditer(text))
    if answer_is:
        candidates.append((answer_is[-1].start(), _SENTENCE_END.split(text[answer_is[-1].end():], 1)[0]))
    hashes = text.rfind("####")
    if hashes >= 0:
        candidates.append((hashes, text[hashes + 4:].split("\n", 1)[0]))
    box_at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    boxed = last_boxed_content(text)
    if boxed is not None:
        candidates.append((box_at, boxed))
    for _, segment in sorted(candidates, reverse=True):
        value = parse_number(segment)
        if value is not None:
            return format_number(value)
    values = _numbers(text)
    return format_number(values[-1]) if values else None


def numbers_equal(prediction: str | None, gold: str) -> bool:
    pred_value, gold_value = parse_number(prediction), parse_number(gold)
    if pred_value is None or gold_value is None:
        return False
    return abs(float(pred_value - gold_value)) <= REL_TOL * max(1.0, abs(float(gold_value)))
