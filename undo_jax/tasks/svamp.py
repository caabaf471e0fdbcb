"""SVAMP (Patel et al. 2021): 1000 arithmetic word problems with no official split.

Local layout (../shared/data/svamp): svamp.jsonl or SVAMP.json, fields ID, Body, Question, Equation, Answer,
Type. The whole set is split 700 train pool / 300 test by a fixed seeded permutation (TEST_SPLIT_SEED, not
the `seed` argument, so every run tests on the same 300). A folder holding train.* and test.* files (the
Hugging Face ChilleD/SVAMP layout, also the hub default) is used with its own 700/300 split instead.
"""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

from undo_jax.tasks.base import Record, require_fields, split_pool
from undo_jax.tasks.numeric import format_number
from undo_jax.tasks.numeric_task import NumericTask
from undo_jax.tasks.sources import TaskDataError, find_split_file, read_rows

TEST_SIZE = 300
TEST_SPLIT_SEED = 20210601  # fixed: the test split must not move with the run seed
FIELDS = ("ID", "Body", "Question", "Equation", "Answer", "Type")

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def exact_number_text(value: Fraction) -> str:
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
    """'( ( 76.0 - 25.0 ) / 3.0 )' -> (['76 - 25 = 51.', '51 / 3 = 17.'], Fraction(17)), in exact arithmetic."""
    try:
        tree = ast.parse(equation.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"SVAMP equation {equation!r} is not an arithmetic expression: {e.msg}") from e
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
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
            elif right == 0:
                raise ValueError(f"SVAMP equation {equation!r} divides by zero")
            else:
                out = left / right
            steps.append(f"{exact_number_text(left)} {_OPS[type(node.op)]} {exact_number_text(right)} = "
                         f"{exact_number_text(out)}.")
            return out
        raise ValueError(f"SVAMP equation {equation!r}: unsupported element {ast.dump(node)[:60]}")

    return steps, walk(tree)


def evaluate_equation(equation: str) -> Fraction:
    """Exact value of an SVAMP infix equation such as "( 76.0 - 25.0 )" (numbers and + - * / only)."""
    return equation_steps(equation)[1]


class SvampTask(NumericTask):
    name = "svamp"
    hf_dataset_id = "ChilleD/SVAMP"
    default_source_hint = "svamp"
    breakdown_key = "type"

    def _make_record(self, row: dict, where: str) -> Record:
        require_fields(row, FIELDS, where, self.name)
        try:
            answer = format_number(Fraction(str(row["Answer"])))
        except (ValueError, ZeroDivisionError):
            raise TaskDataError(f"{where}: Answer {row['Answer']!r} is not a number") from None
        body, question = str(row["Body"]).strip(), str(row["Question"]).strip()
        return Record(
            id=str(row["ID"]),
            question=f"{body} {question}" if body else question,
            answer=answer,
            rationale=None,
            meta={"equation": str(row["Equation"]).strip(), "type": str(row["Type"])},
        )

    def reference_rationale(self, record: Record) -> str | None:
        """The equation as worked steps, innermost first, in exact arithmetic, then the final-answer line."""
        steps, value = equation_steps(str(record.meta["equation"]))
        if not steps:  # a bare number: the answer is stated in the problem
            body = f"The quantity asked for is given directly: {exact_number_text(value)}."
        else:
            body = "Let's compute step by step.\n" + "\n".join(steps)
        return self.with_final_line(body, record)

    def _pools(self, source, split: str) -> dict[str, list[Record]]:
        if source is None:
            return {"train": self._records(self._rows_for(None, (), "train")),
                    "test": self._records(self._rows_for(None, (), "test"))}
        path = Path(source)
        if path.is_dir():
            try:  # pre-split layout (train.* / test.*) takes precedence over the single upstream file
                train_file, test_file = find_split_file(path, ("train",)), find_split_file(path, ("test",))
            except TaskDataError:
                train_file = test_file = None
            if train_file is not None:
                return {"train": self._records(read_rows(train_file)), "test": self._records(read_rows(test_file))}
            path = find_split_file(path, ("svamp", "SVAMP"))
        records = self._records(self._rows_for(path, (), ""))
        if len(records) <= TEST_SIZE:
            raise TaskDataError(f"{path}: {len(records)} SVAMP records, need more than {TEST_SIZE} to split")
        train, test = split_pool(records, TEST_SIZE, TEST_SPLIT_SEED)
        return {"train": train, "test": test}
