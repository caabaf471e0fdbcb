"""Shared answer rules and prompt for the numeric word-problem tasks (SVAMP, GSM8K)."""

from __future__ import annotations

from undo_jax.tasks.base import Record, Task
from undo_jax.tasks.numeric import extract_number, format_number, numbers_equal, parse_number

NUMERIC_CONVENTION = (
    'End the solution with a final line of the form "The answer is N." where N is the final numeric answer '
    "alone (no units)."
)
NUMERIC_INSTRUCTION = (
    'Solve the problem step by step. End your response with a final line of the form "The answer is N." '
    "where N is the final number."
)


class NumericTask(Task):
    answer_convention = NUMERIC_CONVENTION

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{record.question}\n\n{NUMERIC_INSTRUCTION}"}]

    def final_answer_line(self, answer: str) -> str:
        return f"The answer is {answer}."

    def extract_answer(self, text: str) -> str | None:
        return extract_number(text)

    def canonical_answer(self, prediction: str | None) -> str | None:
        value = parse_number(prediction)
        return None if value is None else format_number(value)

    def is_correct(self, prediction: str | None, record: Record) -> bool:
        return numbers_equal(prediction, record.answer)
