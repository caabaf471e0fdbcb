"""Equivalence of MATH final answers: exact, then normalised strings, then numbers, then math-verify (sympy).

math-verify (Hugging Face) parses LaTeX into sympy and compares numbers, expressions, sets, intervals,
tuples and matrices; it bounds each parse and comparison with signal.alarm. Signals only work on the
main thread, so off the main thread the symbolic step is skipped (string and numeric rules still apply).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction

from undo_jax.tasks.latex import normalize_math_answer

SYMBOLIC_TIMEOUT_S = 5
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")


def _as_number(normalized: str) -> Fraction | None:
    if _PLAIN_NUMBER.fullmatch(normalized):
        return Fraction(normalized)
    m = _FRAC.fullmatch(normalized)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    return None


def _symbolic_equal(pred: str, gold: str) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=SYMBOLIC_TIMEOUT_S)
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=SYMBOLIC_TIMEOUT_S)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=SYMBOLIC_TIMEOUT_S))
    except Exception:  # a parse/compare failure or timeout means "not shown equal"
        return False


@functools.lru_cache(maxsize=65536)
def math_answers_equal(pred: str | None, gold: str, symbolic: bool = True) -> bool:
    if pred is None:
        return False
    if pred.strip() == gold.strip():
        return True
    norm_pred, norm_gold = normalize_math_answer(pred), normalize_math_answer(gold)
    if not norm_pred:
        return False
    if norm_pred == norm_gold:
        return True
    num_pred, num_gold = _as_number(norm_pred), _as_number(norm_gold)
    if num_pred is not None and num_gold is not None:
        return abs(float(num_pred - num_gold)) <= 1e-6 * max(1.0, abs(float(num_gold)))
    return symbolic and _symbolic_equal(pred, gold)
