"""Hand-written hard cases for MMLU-Pro option-letter extraction, in both directions."""

import pytest

from undo_jax.tasks import Record, get_task

# (completion, extracted letter or None)
CASES = [
    ("Let's think step by step. ... The answer is (C).", "C"),
    ("The answer is C.", "C"),
    ("the answer is (J)", "J"),
    ("The answer is: (B)", "B"),
    ("The answer is **(D)**.", "D"),
    ("The answer is $\\boxed{E}$.", "E"),
    ("The answer is \\boxed{(F)}", "F"),
    ("The answer is not (A). On reflection, the answer is (B).", "B"),  # official takes the first: A
    ("The answer is (A) or maybe... no. The answer is (H).", "H"),
    ("The answer is Approximately 5 so (D)", "D"),  # official would read "A" from "Approximately"
    ("The correct answer is (G) because of X.", "G"),
    ("Answer: C", "C"),
    ("**Answer:** (E)", "E"),
    ("answer: b", None),  # lowercase letters are not option letters
    ("The answer is (c).", "C"),  # ... unless parenthesised after "answer is" (the official regex misses it)
    ("So the answer is **(h)**", "H"),
    ("the answer is a bit unclear, (B) maybe", "B"),
    ("Answer: All of the options fail, so D", "D"),
    ("Answer: C\nWait, Answer: D", "D"),
    ("Option C is tempting but B fits best.", "B"),
    ("I think the correct option is D", "D"),
    ("I think it is D but I am unsure", "D"),
    ("A triangle has three sides. So E", "E"),
    ("Comparing options, B.", "B"),
    ("(C)", "C"),
    ("C", "C"),
    ("The best choice: (I).", "I"),
    ("\\boxed{H}", "H"),
    ("The result is 42.", None),
    ("", None),
    ("I don't know.", None),
    ("A bird in the hand.", None),
    ("The answer is K.", None),
    ("Vitamins A, B and C. Hmm.", "C"),
    ("The answer is (A)", "A"),
    ("The answer is A", "A"),
    ("so the answer is (A).\n\nNote: option I is wrong.", "A"),
    ("the answer is\n(C)", "C"),
    ("The answer is (B) and not (C).", "B"),
    ("Answer: (J) is right", "J"),
    ("We pick option F's value; thus F", "F"),
    ("It's A.", "A"),
]


@pytest.mark.parametrize(("text", "letter"), CASES)
def test_letter_extraction(text, letter):
    assert get_task("mmlu_pro").extract_answer(text) == letter


@pytest.mark.parametrize(("text", "gold", "expected"), [
    ("The answer is (C).", "C", True),
    ("The answer is (C).", "B", False),
    ("The answer is not (C). The answer is (B).", "C", False),
    ("No idea.", "A", False),  # no answer is wrong, never a random guess
    ("The answer is (A).", "A", True),
])
def test_is_correct(text, gold, expected):
    task = get_task("mmlu_pro")
    record = Record(id="x", question="q", answer=gold, meta={"options": list("0123456789"), "category": "math"})
    assert task.is_correct(task.extract_answer(text), record) is expected


def test_no_answer_scores_wrong_every_time():
    task = get_task("mmlu_pro")
    records = [Record(id=str(i), question="q", answer="ABCD"[i % 4], meta={"category": "law"}) for i in range(40)]
    result = task.score(["I cannot decide."] * 40, records)
    assert result["correct"] == 0 and result["breakdown"]["law"]["n"] == 40
