"""MATH (Hendrycks et al. 2021): train 7500, test 5000 (or the MATH-500 subset).

Local layout (../shared/data/math): train.jsonl, test.jsonl, math500_test.jsonl with fields problem, solution,
level ("Level 3" or 3), type or subject, optional answer and unique_id. The gold answer is the file's `answer`
when present, else the contents of the solution's last \\boxed{}. Rows whose gold answer is empty (two train
problems upstream have an empty \\boxed{}) are left out: nothing could be scored against them.
"""

from __future__ import annotations

import re
from pathlib import Path

from undo_jax.tasks.base import Record, Task, require_fields
from undo_jax.tasks.latex import last_boxed_content, normalize_math_answer
from undo_jax.tasks.math_equiv import math_answers_equal
from undo_jax.tasks.sources import load_hub_rows

MATH_CONVENTION = (
    'End the solution with a final line of the form "The answer is $\\boxed{X}$." where X is the final answer '
    "in simplest form (LaTeX allowed)."
)
MATH_INSTRUCTION = (
    'Solve the problem step by step. End your response with a final line of the form "The answer is $\\boxed{X}$." '
    "where X is the final answer."
)
TEST_SETS = {"full": ("test",), "math500": ("math500_test", "test")}
HUB_TEST = {"full": "DigitalLearningGmbH/MATH-lighteval", "math500": "HuggingFaceH4/MATH-500"}

_FINAL_ANSWER_IS = re.compile(r"(?:final answer|answer) is[:\s]*(.+?)(?:\.\s*(?:I hope it is correct\.?)?)?\s*$",
                              re.IGNORECASE)


def _level(value) -> int | None:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d)\s*", str(value))
    return int(m.group(1)) if m else None  # upstream "Level ?" (two train problems)


class MathTask(Task):
    name = "math"
    hf_dataset_id = "DigitalLearningGmbH/MATH-lighteval"
    default_source_hint = "math"
    breakdown_key = "level"
    answer_convention = MATH_CONVENTION

    def __init__(self, test_set: str = "full") -> None:
        super().__init__()
        if test_set not in TEST_SETS:
            raise ValueError(f"unknown MATH test set {test_set!r}; expected one of {', '.join(TEST_SETS)}")
        self.test_set = test_set

    def _make_record(self, row: dict, where: str, record_id: str = "") -> Record:
        require_fields(row, ("problem", "solution", "level"), where, self.name)
        subject = row.get("type", row.get("subject"))
        if subject is None:
            require_fields(row, ("type",), where, self.name)
        solution = str(row["solution"])
        answer = row.get("answer")
        answer = str(answer).strip() if answer is not None else (last_boxed_content(solution) or "")
        return Record(
            id=str(row.get("unique_id") or record_id),
            question=str(row["problem"]).strip(),
            answer=answer,
            rationale=solution,
            meta={"level": _level(row["level"]), "subject": str(subject)},
        )

    def _pools(self, source, split: str) -> dict[str, list[Record]]:
        single_file = source is not None and Path(source).is_file()
        pools = {}
        for pool in ("train", "test"):
            if single_file and (pool == "test") != (split == "test"):
                continue
            if source is None and pool == "test":
                rows = load_hub_rows(HUB_TEST[self.test_set], None, "test")
            else:
                rows = self._rows_for(source, ("train",) if pool == "train" else TEST_SETS[self.test_set], pool)
            records = [self._make_record(row, where, f"{pool}/{i}") for i, (where, row) in enumerate(rows)]
            pools[pool] = [r for r in records if r.answer]
        return pools

    def group_of(self, record: Record) -> str:
        level = record.meta.get("level")
        return f"Level {level}" if level is not None else "Level ?"

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{record.question}\n\n{MATH_INSTRUCTION}"}]

    def final_answer_line(self, answer: str) -> str:
        return f"The answer is $\\boxed{{{answer}}}$."

    def extract_answer(self, text: str) -> str | None:
        """The last \\boxed{}/\\fbox{} (None if it is unbalanced); else a last line "[final] answer is X"."""
        if not text:
            return None
        boxed = last_boxed_content(text)
        if boxed is not None:
            return boxed or None
        if "\\boxed" in text or "\\fbox" in text:
            return None  # the last box never closes: a truncated completion has no final answer
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if not lines:
            return None
        m = _FINAL_ANSWER_IS.search(lines[-1])
        if m is None:
            return None
        answer = m.group(1).strip().strip("$").strip()
        return answer or None

    def canonical_answer(self, prediction: str | None) -> str | None:
        return None if prediction is None else normalize_math_answer(prediction)

    def is_correct(self, prediction: str | None, record: Record) -> bool:
        return math_answers_equal(prediction, record.answer)
