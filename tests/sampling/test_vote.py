"""maj@k voting: most common extracted answer, deterministic ties, abstentions."""

from __future__ import annotations

import re

import pytest

from undo_jax.sampling import majority_vote


def last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return numbers[-1] if numbers else None


def test_most_common_answer_wins_with_its_first_text():
    texts = ["so 4", "it is 7", "answer 7", "I think 4", "7 again", "no idea"]
    assert majority_vote(texts, last_number) == ("7", 1)


def test_ties_go_to_the_answer_seen_first():
    assert majority_vote(["3", "5", "5", "3"], last_number) == ("3", 0)
    assert majority_vote(["5", "3", "3", "5"], last_number) == ("5", 0)
    assert majority_vote(["x", "2", "9"], last_number) == ("2", 1)


def test_unextractable_texts_do_not_vote():
    assert majority_vote(["none", "nothing", "12"], last_number) == ("12", 2)
    assert majority_vote(["none", "nothing"], last_number) == (None, 0)
    with pytest.raises(ValueError, match="at least one text"):
        majority_vote([], last_number)


def test_with_generated_samples(toy_tokenizer):
    from tests.sampling.conftest import tiny_model
    from undo_jax.sampling import generate

    (samples,) = generate(tiny_model("qwen2", seed=1, std=0.1), toy_tokenizer, ["What is 2 + 3?"],
                          max_new_tokens=12, temperature=1.0, num_samples=4, seed=3)
    first_char = lambda text: text[:1] or None  # noqa: E731
    answer, index = majority_vote([s.text for s in samples], first_char)
    counts = [s.text[:1] for s in samples]
    assert answer == samples[index].text[:1] and counts.count(answer) == max(counts.count(c) for c in counts if c)
