"""The reference teacher: offline and deterministic, it writes each rationale from the dataset's own
gold solution. It is the teacher of the offline demo and of CI; it ignores gap reports (it has no
model to rewrite with), and says so in every response's metadata.

The rationale is the task's own `Task.reference_rationale` (the one writer of gold rationales): GSM8K
without calculator notes, MATH's solution, SVAMP's equation as worked steps, MMLU-Pro's CoT or the
statement of the correct option; each ending in `task.final_answer_line(record.answer)`.
"""

from __future__ import annotations

from typing import Any

from undo_jax.teachers.base import Teacher
from undo_jax.teachers.types import SampleResult

REFERENCE_LABEL = "reference teacher: dataset gold solutions (offline demo / CI); not a language model"
GAP_REPORT_TEXT = (
    "The reference teacher does not analyse learning gaps: it writes every rationale from the "
    "dataset's gold solution and ignores gap reports."
)


def reference_rationale(task, record) -> str:
    """The gold rationale of `record` as the task writes it (`Task.reference_rationale`), ending in the task's
    final-answer line; ValueError (one line) for a record without a gold solution."""
    text = task.reference_rationale(record)
    if text is None:
        raise ValueError(f"reference teacher: record {record.id!r} of task {getattr(task, 'name', '')!r} has no "
                         f"gold solution")
    return text


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
