"""maj@k: the most common extracted answer among k sampled completions."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence


def majority_vote(texts: Sequence[str], extract_fn: Callable[[str], Hashable | None]) -> tuple[Hashable | None, int]:
    """-> (winning answer, index of the first text that gave it).

    Texts whose answer cannot be extracted (extract_fn returns None) do not vote. Ties go to the
    answer that appears first in `texts`, so the result depends only on the order of the samples.
    When no text yields an answer the result is (None, 0).
    """
    if not texts:
        raise ValueError("majority_vote needs at least one text")
    counts: dict[Hashable, int] = {}
    first_index: dict[Hashable, int] = {}
    for i, text in enumerate(texts):
        answer = extract_fn(text)
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first_index.setdefault(answer, i)
    if not counts:
        return None, 0
    winner = max(counts, key=lambda a: (counts[a], -first_index[a]))
    return winner, first_index[winner]
