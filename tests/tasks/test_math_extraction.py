"""Hand-written hard cases for MATH: boxed extraction, normalisation and symbolic equivalence."""

import threading

import pytest

from undo_jax.tasks import Record, get_task
from undo_jax.tasks.latex import last_boxed_content, normalize_math_answer

# (completion, gold answer, must the completion be scored correct?)
CASES = [
    ("So $x = \\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("The answer is $\\boxed{0.5}$.", "\\frac{1}{2}", True),
    ("The answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac12", True),
    ("The answer is $\\boxed{\\tfrac{3}{4}}$.", "\\frac{3}{4}", True),
    ("The answer is $\\boxed{3/4}$.", "\\frac{3}{4}", True),
    ("The answer is $\\boxed{\\frac{1}{3}}$.", "0.33", False),
    ("The answer is $\\boxed{\\frac{2}{3}}$.", "\\frac{3}{2}", False),
    ("First $\\boxed{3}$, then correcting: $\\boxed{5}$.", "5", True),
    ("First $\\boxed{3}$, then correcting: $\\boxed{5}$.", "3", False),
    ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt3}{2}", True),
    ("$\\boxed{\\sqrt{2}/2}$", "\\frac{\\sqrt{2}}{2}", True),
    ("$\\boxed{\\sqrt{3}}$", "\\sqrt{2}", False),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "(3,\\frac{\\pi}{2})", True),
    ("$\\boxed{(2, 3)}$", "(3, 2)", False),
    ("$\\boxed{[2, 5)}$", "[2,5)", True),
    ("$\\boxed{(2, 5)}$", "[2,5)", False),
    ("$\\boxed{(-\\infty, 3] \\cup [5, \\infty)}$", "(-\\infty,3]\\cup[5,\\infty)", True),
    ("$\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("$\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}$", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False),
    ("$\\boxed{x^2+2x+1}$", "(x+1)^2", True),
    ("$\\boxed{x^2+2x+2}$", "(x+1)^2", False),
    ("$\\boxed{90^\\circ}$", "90", True),
    ("$\\boxed{90^{\\circ}}$", "90^\\circ", True),
    ("$\\boxed{45^\\circ}$", "90", False),
    ("$\\boxed{10\\%}$", "10", True),
    ("$\\boxed{\\$1,\\!000}$", "1000", True),
    ("$\\boxed{1,000}$", "1000", True),
    ("$\\boxed{12 \\text{ cm}}$", "12", True),
    ("$\\boxed{12\\text{ square units}}$", "12", True),
    ("$\\boxed{\\text{Monday}}$", "\\text{Monday}", True),
    ("$\\boxed{\\text{Tuesday}}$", "\\text{Monday}", False),
    ("$\\boxed{x = 5}$", "5", True),
    ("$\\boxed{y = 2x + 3}$", "y=2x+3", True),
    ("$\\boxed{\\textbf{(C)}}$", "\\text{(C)}", True),
    ("$\\boxed{5.0}$", "5", True),
    ("$\\boxed{-\\frac{1}{4}}$", "-\\frac14", True),
    ("$\\boxed{\\frac{1}{4}}$", "-\\frac{1}{4}", False),
    ("$\\boxed{2, 3}$", "3, 2", True),
    ("$\\boxed{2\\sqrt{5}}$", "\\sqrt{20}", True),
    ("$\\boxed{\\pi}$", "3.14", False),
    ("\\fbox{7}", "7", True),
    ("$\\boxed 7$", "7", True),
    ("The answer is $\\boxed{\\frac{1}{2}", "\\frac{1}{2}", False),  # truncated: no balanced box
    ("Final Answer: The final answer is $\\frac{7}{2}$. I hope it is correct.", "\\frac72", True),
    ("The answer is 12.", "12", True),
    ("I think it is 12 but I am not sure", "12", False),  # no boxed and no answer line: no answer
    ("", "12", False),
    ("$\\boxed{}$", "0", False),
    ("$\\boxed{\\infty}$", "\\infty", True),
    ("$\\boxed{ 4 }$", "4", True),
]


@pytest.mark.parametrize(("text", "gold", "expected"), CASES)
def test_math_cases(text, gold, expected):
    task = get_task("math")
    assert task.is_correct(task.extract_answer(text), Record(id="x", question="q", answer=gold)) is expected


@pytest.mark.parametrize(("text", "content"), [
    ("a $\\boxed{\\frac{1}{2}}$ b", "\\frac{1}{2}"),
    ("\\boxed{1} and \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("\\fbox{3} then \\boxed{4}", "4"),
    ("\\boxed{4} then \\fbox{3}", "3"),
    ("\\boxed{unbalanced", None),
    ("no box", None),
])
def test_last_boxed_content(text, content):
    assert last_boxed_content(text) == content


@pytest.mark.parametrize(("raw", "normal"), [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\left( 1, 2 \\right)", "(1,2)"), ("10\\%", "10"),
    ("\\text{(A)}", "(A)"), ("x = 3", "3"), ("\\frac12", "\\frac{1}{2}"), ("\\sqrt2", "\\sqrt{2}"),
    ("1/3", "\\frac{1}{3}"), ("5 \\text{ inches}", "5"), ("1,000,000", "1000000"), (".5", "\\frac{1}{2}"),
])
def test_normalization(raw, normal):
    assert normalize_math_answer(raw) == normal


def test_symbolic_step_skipped_off_main_thread():
    """math-verify's timeouts need signals; in a worker thread only the string/numeric rules apply."""
    task = get_task("math")
    record = Record(id="x", question="q", answer="(x+1)^2")
    results = {}
    thread = threading.Thread(target=lambda: results.update(
        sym=task.is_correct("x^2+2x+1 ", record), num=task.is_correct("0.5", Record("y", "q", "\\frac{1}{2}"))))
    thread.start()
    thread.join()
    assert results == {"sym": False, "num": True}
    assert task.is_correct("x^2+2x+1", record)


def test_vote_key_merges_equivalent_spellings():
    task = get_task("math")
    keys = {task.vote_key(t) for t in ("$\\boxed{\\dfrac{1}{2}}$", "\\boxed{\\frac12}", "\\boxed{0.5}")}
    assert keys == {"\\frac{1}{2}"}
