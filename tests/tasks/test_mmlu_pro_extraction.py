"""Hand-written hard cases for MMLU-Pro option-letter extraction, in both directions."""

import pytest

from undo_jax.tasks import Record, get_task

# (completion, extracted letter or None). The expected letters follow the rules of multiple_choice.py, in order:
# 1. the LAST "answer is (X)" (official: the first); 2. the last "Answer: X"; 3. the last \\boxed{X};
# 4. otherwise the last standalone capital A-J that does not run on into a word, skipping the pronoun "I" and
#    the article "A" opening a sentence (both followed by a lowercase word); 5. otherwise None.
# Each case below names the rule that decides it (the official script would differ where noted).
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
    ("Answer: All of the options fail, so D", "D"),  # rule 2 has no letter (All runs on), rule 4: last standalone is D
    ("Answer: C\nWait, Answer: D", "D"),
    ("Option C is tempting but B fits best.", "B"),  # rule 4: the last standalone letter is B
    ("I think the correct option is D", "D"),  # rule 4: "I" + lowercase word is the pronoun; D
    ("I think it is D but I am unsure", "D"),  # rule 4: both "I" are pronouns (+ lowercase word); D
    ("A triangle has three sides. So E", "E"),  # rule 4: the last standalone letter is E
    ("Comparing options, B.", "B"),  # rule 4: the only standalone letter
    ("(C)", "C"),
    ("C", "C"),
    ("The best choice: (I).", "I"),
    ("\\boxed{H}", "H"),
    ("The result is 42.", None),
    ("", None),
    ("I don't know.", None),
    ("A bird in the hand.", None),  # rule 4: sentence-opening "A" + lowercase word is the article; rule 5
    ("The answer is K.", None),  # K is not an option letter (A-J) anywhere; rule 5
    ("Vitamins A, B and C. Hmm.", "C"),  # rule 4: "A" here does not open a sentence; the last standalone is C
    ("The answer is (A)", "A"),
    ("The answer is A", "A"),
    ("so the answer is (A).\n\nNote: option I is wrong.", "A"),  # rule 1 wins over rule 4 ("I is")
    ("the answer is\n(C)", "C"),
    ("The answer is (B) and not (C).", "B"),
    ("Answer: (J) is right", "J"),
    ("We pick option F's value; thus F", "F"),  # rule 4: "F's" runs on (apostrophe), the last F stands alone
    ("It's A.", "A"),  # rule 4: "A." does not open a sentence and no lowercase word follows
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
