"""Option-letter extraction (MMLU-Pro), after the official TIGER-Lab script with three deliberate changes.

Official order: first "answer is (X)" -> last "Answer: X" -> last standalone letter A-J -> random guess.
Ours: the LAST "answer is (X)" (a model that corrects itself ends with its final choice), a letter must not
run on into a word ("answer is Approximately" is no answer), a boxed letter counts, and the standalone
fallback skips the article "A" opening a sentence and the pronoun "I"; a parenthesised lower-case letter after
"answer is" ("The answer is (c).") is that letter. No answer is None (scored wrong), never a random guess.
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"
_END = r"(?![A-Za-z0-9'])"
_ANSWER_IS = re.compile(
    r"(?i:answer)\s+is\s*:?\s*(?:\*\*|\$)?\s*(?:\\boxed\{|\\text\{)?\s*\(?([A-J])\)?" + _END
)
# "The answer is (c)." -- a lower-case letter counts when parenthesised (the official regex misses it; a bare
# lower-case letter stays a word: "the answer is a bit unclear").
_ANSWER_IS_LOWER = re.compile(r"(?i:answer)\s+is\s*:?\s*(?:\*\*)?\s*\(([a-j])\)" + _END)
_ANSWER_COLON = re.compile(r"(?i:answer)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*\(?([A-J])\)?" + _END)
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\s*\}")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'\\])([A-J])" + _END)
_SENTENCE_START = re.compile(r"(?:^|[.!?:]\s+|\n\s*)$")


def _is_word_use(text: str, m: re.Match) -> bool:
    """True when a standalone "A" or "I" is an English word rather than an option letter."""
    letter, after = m.group(1), text[m.end():m.end() + 2]
    if letter == "I":
        return bool(re.match(r"\s[a-z]", after))
    if letter == "A":
        return bool(re.match(r"\s[a-z]", after)) and bool(_SENTENCE_START.search(text[:m.start()]))
    return False


def extract_letter(text: str) -> str | None:
    if not text:
        return None
    answer_is = [(m.start(), m.group(1)) for m in _ANSWER_IS.finditer(text)]
    answer_is += [(m.start(), m.group(1).upper()) for m in _ANSWER_IS_LOWER.finditer(text)]
    if answer_is:
        return max(answer_is)[1]
    for pattern in (_ANSWER_COLON, _BOXED):
        matches = pattern.findall(text)
        if matches:
            return matches[-1]
    for m in reversed(list(_STANDALONE.finditer(text))):
        if not _is_word_use(text, m):
            return m.group(1)
    return None
