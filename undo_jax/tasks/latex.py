"""LaTeX answer helpers: the last balanced \\boxed{} / \\fbox{}, and Hendrycks/Minerva answer normalisation."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (nested braces balanced), or of `\\boxed 5`; else None.

    An unbalanced last box (a truncated completion) gives None rather than a partial answer.
    """
    if not text:
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    i = start + len(cmd)
    if text.startswith(" ", i):  # "\boxed 5" form: the token up to a space or "$"
        m = re.match(r"\s+([^\s$]+)", text[i:])
        return m.group(1).rstrip(".") if m else None
    if not text.startswith("{", i):
        return None
    j = _matching_brace(text, i)
    return None if j is None else text[i + 1:j].strip()


def _matching_brace(text: str, i: int) -> int | None:
    """Index of the "}" that closes the "{" at text[i], or None if it never closes."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _unwrap_command(s: str, command: str) -> str:
    """Replace every `\\command{X}` (X with balanced braces) by X."""
    out = s
    while True:
        start = out.find(command + "{")
        if start < 0:
            return out
        i = start + len(command)
        j = _matching_brace(out, i)
        if j is None:
            return out
        out = out[:start] + out[i + 1:j] + out[j + 1:]


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}` (Hendrycks)."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
    return out


def _fix_sqrt(s: str) -> str:
    """`\\sqrt2` -> `\\sqrt{2}` (Hendrycks)."""
    return re.sub(r"\\sqrt(?![{\[])\s*(\w)", r"\\sqrt{\1}", s)


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


# Minerva's unit words and decorations (normalize_final_answer), removed from answers before comparison.
_UNIT_TEXT = re.compile(
    r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:square|sq\.?|cubic)?\s*(?:units?|degrees?|cm|m|meters?|"
    r"(?:centi|milli|kilo)?meters?|inches|inch|feet|"
    r"foot|ft|km|miles?|mph|hours?|minutes?|seconds?|days?|weeks?|years?|dollars?|cents?|pounds?|ways|"
    r"students|people|points|digits|edges|meals|integers|multiples)\^?\d?\s*\}"
)
_TRAILING_WORDS = re.compile(
    r"\s*(?:square|sq\.?|cubic)?\s*(?:units?|degrees?|cm|(?:centi|milli|kilo)?meters?|inches|feet|ft|km|miles?|"
    r"mph|hours?|minutes?|"
    r"seconds?|days?|dollars?|cents?|pounds?|ways)(?:\^\d|\^\{\d\})?\s*$"
)


def normalize_math_answer(answer: str) -> str:
    """A string normal form of a MATH final answer (Hendrycks strip_string + Minerva normalize_final_answer)."""
    s = answer.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = re.sub(r"\\\\(?![a-zA-Z])", r"\\", s) if "\\begin" not in s else s
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(text|textbf|mbox|mathrm)\s+\{", r"\\\1{", s)
    # Hendrycks: "\text{ " (a space inside the brace) only ever starts a unit, so drop it and what follows.
    head = s.split("\\text{ ")[0]
    if head.strip() and head != s:
        s = head
    s = _UNIT_TEXT.sub("", s)
    s = _TRAILING_WORDS.sub("", s)
    for command in ("\\text", "\\textbf", "\\mbox", "\\mathrm", "\\mathbf", "\\boxed"):
        s = _unwrap_command(s, command)
    s = s.replace("\\dots", "").replace("\\ldots", "")
    s = s.strip().rstrip(".").strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5", "k=3": keep the value (Hendrycks: only when the left side is at most two characters).
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)
