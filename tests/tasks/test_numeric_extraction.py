"""Hand-written hard cases for the numeric tasks (SVAMP, GSM8K), in both directions."""

import pytest

from undo_jax.tasks import Record, get_task

# (completion, gold answer, must the completion be scored correct?)
SHARED_CASES = [
    ("The answer is 42.", "42", True),
    ("The answer is 42.", "24", False),
    ("The answer is $1,000.", "1000", True),
    ("The answer is 1,000", "1", False),
    ("So she pays $1,234,567.89 in total. The answer is $1,234,567.89", "1234567.89", True),
    ("The answer is -5.", "-5", True),
    ("The answer is -5.", "5", False),
    ("The answer is 5.", "-5", False),
    ("The answer is \u22127.", "-7", True),
    ("The answer is 0.5", "0.5", True),
    ("The answer is .5", "0.5", True),
    ("The answer is 1/2.", "0.5", True),
    ("The answer is 3/4", "0.75", True),
    ("The answer is 2/3", "0.67", False),
    ("The answer is 3.50 dollars.", "3.5", True),
    ("The answer is 3.5", "35", False),
    ("The answer is 50%.", "50", True),
    ("The answer is 50%.", "0.5", False),
    ("The answer is 12 apples.", "12", True),
    ("The answer is 7 cm.", "7", True),
    ("The answer is 8.0", "8", True),
    ("The answer is 8.001", "8", False),
    ("The answer is 0.333333333", "1/3", True),
    ("The final answer is 36", "36", True),
    ("Answer: 19", "19", True),
    ("The answer is: 19", "19", True),
    ("He has 3 + 4 = 7 apples.\n#### 7", "7", True),
    ("#### 1,200", "1200", True),
    ("So the total is $\\boxed{24}$.", "24", True),
    ("So the total is $\\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("So the total is \\boxed{1{,}000}.", "1000", True),
    ("The answer is 10.\nActually no, recomputing: 5 + 6 = 11.\nThe answer is 11.", "11", True),
    ("The answer is 10.\nActually no, recomputing: 5 + 6 = 11.\nThe answer is 11.", "10", False),
    ("The answer is 120. Check: 15 * 8 = 120", "120", True),
    ("She had 20 and gave away 5, so 20 - 5 = 15", "15", True),
    ("She had 20 and gave away 5, so 20 - 5 = 15", "-5", False),
    ("First 5-3=2, so she keeps 2", "2", True),
    ("Temperatures fell to -12 degrees", "-12", True),
    ("There are 1, 2, 3 boxes; total 6", "6", True),
    ("There are 1, 2, 3", "123", False),
    ("I am not sure.", "0", False),
    ("", "0", False),
    ("The answer is 1e3", "1000", False),
    ("The answer is 00012", "12", True),
    ("The answer is 999,999", "999999", True),
    ("The answer is 12,34", "1234", False),
    # The rule (numeric.py docstring): the "answer is" sentence holds no number ("twelve" is a word), so the
    # last number anywhere in the text is the answer: 12, not the 2 of "2 dozen".
    ("The answer is twelve. That is 2 dozen minus 12.", "12", True),
    # a/b with b = 0 is no number, so the "answer is" sentence holds none; the last number in the text is 4.
    ("The answer is 1/0. Then 4", "4", True),
    ("Total cost: $45.\nThe answer is 45.", "45", True),
    ("The answer is 0", "0", True),
    ("The answer is 0", "-0.0", True),
]

SVAMP_CASES = [
    ("Each pack costs 76 - 25 = 51 dollars.\nThe answer is 51.", "51", True),
    ("76 - 25 = 51. The answer is 51 dollars per pack.", "51", True),
    ("There were 4.0 + 3.0 = 7.0 birds. The answer is 7.0.", "7", True),
    ("( 76.0 - 25.0 ) = 51.0", "51", True),
    ("( 76.0 - 25.0 ) = 51.0", "25", False),
]
GSM8K_CASES = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72", True),
    ("the final answer is 15 gallons * 8 pints / gallon = 120 pints\n#### 120", "120", True),
    ("the final answer is 15 gallons * 8 pints / gallon = 120 pints\n#### 120", "15", False),
    ("Janet makes 9 * $2 = $<<9*2=18>>18 every day.\n#### 18", "18", True),
    ("#### -3", "-3", True),
]


@pytest.mark.parametrize("task_name", ["svamp", "gsm8k"])
@pytest.mark.parametrize(("text", "gold", "expected"), SHARED_CASES)
def test_shared_numeric_cases(task_name, text, gold, expected):
    task = get_task(task_name)
    record = Record(id="x", question="q", answer=gold)
    assert task.is_correct(task.extract_answer(text), record) is expected


@pytest.mark.parametrize(("task_name", "text", "gold", "expected"),
                         [("svamp", *c) for c in SVAMP_CASES] + [("gsm8k", *c) for c in GSM8K_CASES])
def test_task_specific_numeric_cases(task_name, text, gold, expected):
    task = get_task(task_name)
    assert task.is_correct(task.extract_answer(text), Record(id="x", question="q", answer=gold)) is expected


@pytest.mark.parametrize(("text", "canonical"), [
    ("The answer is $1,000.", "1000"), ("The answer is 1/4", "0.25"), ("The answer is -2.50", "-2.5"),
    ("#### 7", "7"), ("no digits here", None),
])
def test_extract_returns_canonical_number(text, canonical):
    assert get_task("gsm8k").extract_answer(text) == canonical


def test_vote_key_merges_spellings():
    task = get_task("svamp")
    keys = {task.vote_key(t) for t in ["The answer is $1,000.", "#### 1000", "\\boxed{1000.0}"]}
    assert keys == {"1000"}
