"""The reference teacher: offline and deterministic, it writes each rationale from the dataset's own
gold solution. It is the teacher of the offline demo and of CI; it ignores gap reports (it has no
model to rewrite with), and says so in every response's metadata.

Per task (dispatch on the task name in the request context):
- gsm8k: the gold answer text without `<<...>>` calculator notes and without the `#### n` line;
- math: the MATH solution as written;
- svamp: the equation rendered as worked steps, innermost first, in exact (Fraction) arithmetic;
- mmlu_pro: `cot_content` without its leading "A: " where present; otherwise (every test record)
  the statement of the correct option;
each ending in `task.final_answer_line(record.answer)`.
"""

from __future__ import annotations

import ast
from fractions import Fraction
from typing import Any

from undo_jax.teachers.base import Teacher
from undo_jax.teachers.types import SampleResult

REFERENCE_LABEL = "reference teacher: dataset gold solutions (offline demo / CI); not a language model"
GAP_REPORT_TEXT = (
    "The reference teacher does not analyse learning gaps: it writes every rationale from the "
    "dataset's gold solution and ignores gap reports."
)
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def format_number(value: Fraction) -> str:
    """Exact rendering: integers plainly, terminating decimals as decimals, otherwise a fraction."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1:  # terminating decimal: print exactly
        sign = "-" if value < 0 else ""
        v = abs(value)
        whole, rest = divmod(v.numerator, v.denominator)
        digits = ""
        while rest:
            rest *= 10
            d, rest = divmod(rest, v.denominator)
            digits += str(d)
        return f"{sign}{whole}.{digits}"
    return f"{value.numerator}/{value.denominator}"


def equation_steps(equation: str) -> tuple[list[str], Fraction]:
    """'( ( 76.0 - 25.0 ) / 3.0 )' -> (['76 - 25 = 51.', '51 / 3 = 17.'], Fraction(17))."""
    try:
        tree = ast.parse(equation.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"SVAMP equation {equation!r} is not an arithmetic expression: {e.msg}") from e
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))  # str(): the literal as written, not its binary float
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                out = left + right
            elif isinstance(node.op, ast.Sub):
                out = left - right
            elif isinstance(node.op, ast.Mult):
                out = left * right
            else:
                if right == 0:
                    raise ValueError(f"SVAMP equation {equation!r} divides by zero")
                out = left / right
            steps.append(f"{format_number(left)} {_OPS[type(node.op)]} {format_number(right)} = {format_number(out)}.")
            return out
        raise ValueError(f"SVAMP equation {equation!r}: unsupported element {ast.dump(node)[:60]}")

    value = walk(tree)
    return steps, value


def svamp_rationale(record) -> str:
    steps, value = equation_steps(str(record.meta["equation"]))
    if not steps:  # a bare number: the answer is stated in the problem
        return f"The quantity asked for is given directly: {format_number(value)}."
    return "Let's compute step by step.\n" + "\n".join(steps)


def _option_statement(task, record) -> str:
    """MMLU-Pro test records have no CoT: state the correct option (no reasoning to imitate)."""
    options = record.meta.get("options") or []
    letter = str(record.answer).strip().strip("()")
    idx = ord(letter) - ord("A") if len(letter) == 1 and letter.isalpha() else -1
    if 0 <= idx < len(options):
        return f"The correct option is ({letter}): {str(options[idx]).strip()}."
    return f"The correct option is ({letter})."


def reference_rationale(task, record) -> str:
    """The gold rationale of `record`, ending in the task's final-answer line.

    SVAMP's equation is rendered as worked steps here; the other tasks' gold solutions are
    rewritten by the task itself (`Task.reference_rationale`: GSM8K without calculator notes,
    MATH's solution, MMLU-Pro's CoT).
    """
    name = getattr(task, "name", "")
    if name == "svamp":
        body = svamp_rationale(record)
    else:
        body = task.reference_rationale(record)
        if body is None:
            if name != "mmlu_pro":
                raise ValueError(f"reference teacher: record {record.id!r} of task {name!r} has no gold solution")
            body = _option_statement(task, record)
    body = body.rstrip()
    final = task.final_answer_line(str(record.answer))
    if body.endswith(final):  # the task's rewrite (or an MMLU-Pro CoT) already ends with it
        return body
    return f"{body}\n{final}" if body else final


class ReferenceTeacher(Teacher):
    """Offline teacher; reads `request.context` = {"kind", "task" (name or Task), "record"}.

    Not cached: it is free and deterministic, and its output depends on the context, which by
    contract is not part of the cache key (two records may share a prompt).
    """

    backend = "reference"
    cacheable = False

    def __init__(self, model: str = "gold", **kwargs):
        self.model = model
        kwargs.pop("cache_path", None)
        super().__init__(**kwargs)
        self._tasks: dict[str, Any] = {}

    def response_metadata(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "label": REFERENCE_LABEL, "ignores_gap_reports": True}

    def _task(self, task: Any):
        if not isinstance(task, str):
            return task
        if task not in self._tasks:
            from undo_jax.tasks import get_task

            self._tasks[task] = get_task(task)
        return self._tasks[task]

    def answer(self, context: dict[str, Any] | None) -> SampleResult:
        if not context or "kind" not in context:
            raise ValueError("reference teacher needs request.context with 'kind' (and 'task', 'record')")
        kind = context["kind"]
        if kind == "gaps":
            return SampleResult(GAP_REPORT_TEXT, "stop")
        if kind not in ("rationale", "rewrite"):
            raise ValueError(f"reference teacher: unknown context kind {kind!r} (rationale|rewrite|gaps)")
        if context.get("task") is None or context.get("record") is None:
            raise ValueError(f"reference teacher: context of kind {kind!r} needs 'task' and 'record'")
        text = reference_rationale(self._task(context["task"]), context["record"])
        return SampleResult(text, "stop")

    def _dispatch(self, requests, keys, units, on_result, progress) -> None:
        for i, s in units:
            try:
                result: SampleResult | str = self.answer(requests[i].context)
            except (ValueError, KeyError, TypeError) as e:
                result = f"{type(e).__name__}: {e}"
            on_result((i, s), result)
