"""A scripted test-double teacher: deterministic text per request kind, so the tests can see what the loop did.

- rationale: "First draft" + the gold steps, with a wrong final answer for every 4th question (filtered out);
- gaps: a fixed report naming the number of failures it was shown;
- rewrite: "Revised after gap report" + the gold steps, only if the request really carries the gap report;
  a wrong final answer for every 3rd question (so the previous rationale must be kept).
It derives from the real Teacher base class, so caching and the cost ledger work as for any backend.
"""

from __future__ import annotations

from undo_jax.tasks.svamp import equation_steps
from undo_jax.teachers import SampleResult, Teacher

GAP_MARKER = "GAP-REPORT: the student drops the last arithmetic step."


def _number(record) -> int:
    return int(record.id.split("-")[-1])


class ScriptedTeacher(Teacher):
    backend = "scripted"
    model = "v1"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.requests: list[tuple[str, str]] = []  # (kind, prompt) of every request dispatched

    def _answer(self, request) -> str:
        ctx = request.context
        kind = ctx["kind"]
        prompt = request.messages[-1]["content"]
        self.requests.append((kind, prompt))
        if kind == "gaps":
            shown = prompt.count("### Problem")
            return f"{GAP_MARKER}\n- It was wrong on {shown} shown problems."
        record = ctx["record"]
        steps, _ = equation_steps(record.meta["equation"])
        body = "\n".join(steps)
        if kind == "rationale":
            answer = int(float(record.answer)) + 1 if _number(record) % 4 == 0 else record.answer
            return f"First draft.\n{body}\nThe answer is {answer}."
        if GAP_MARKER not in prompt:
            return "The rewrite request carried no gap report."
        answer = int(float(record.answer)) + 7 if _number(record) % 3 == 0 else record.answer
        return f"Revised after gap report: step by step.\n{body}\nThe answer is {answer}."

    def _dispatch(self, requests, keys, units, on_result, progress) -> None:
        for i, s in units:
            on_result((i, s), SampleResult(self._answer(requests[i]), "stop", 10, 20))
