"""Unusable teacher output is not silently used: an empty rationale or one without a final-answer line is
asked once more (and counted), and a degenerate gap report (one line repeated) stops the iteration with one
line unless --allow_weak_gap_report; the report lists both."""

from __future__ import annotations

import pytest

from tests.undo.scripted_teacher import ScriptedTeacher
from tests.undo.test_loop_e2e import number, tiny_config
from undo_jax.undo import RunDir, UndoError, run
from undo_jax.undo.data_plan import gap_report_problem
from undo_jax.undo.rundir import read_jsonl

DEGENERATE = "\n".join(["The answer is 154"] * 10)


class WeakTeacher(ScriptedTeacher):
    """Questions 1 and 2: an unusable first rationale (empty / no answer), a good one when asked again;
    every gap report is degenerate, retried or not."""

    def __init__(self, weak: tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self.weak = weak

    def _answer(self, request) -> str:
        text = super()._answer(request)
        kind = request.context["kind"]
        retry = "retry-unusable" in request.cache_salt
        if kind == "gaps":
            return DEGENERATE
        record = request.context.get("record")
        if kind == "rationale" and not retry and record.id in self.weak:
            return "" if number(record.id) % 2 else "I am not sure how to solve this."
        return text


def test_gap_report_checks():
    from undo_jax.teachers import TeacherResponse

    def problem(text):
        return gap_report_problem(TeacherResponse([text], ["stop"]))

    assert problem(DEGENERATE).startswith("degenerate gap report (10 lines, 1 distinct)")
    assert problem("") == "empty gap report"
    assert problem("- The student drops the last step.\n- It misreads 'twice as many'.") is None


def test_unusable_answers_are_retried_and_a_weak_gap_report_stops(tmp_path, tiny_student):
    run_dir = tmp_path / "run"
    settings = dict(train_size=8, val_size=4, test_size=4, epochs_first=1, eval_base=False, max_iterations=2)
    from undo_jax.config import demo_data_path
    from undo_jax.tasks import get_task

    train = get_task("svamp").load("train", demo_data_path(), val_size=4)[:8]
    weak = (train[0].id, train[1].id)
    teacher = WeakTeacher(weak, cache_path=str(tmp_path / "cache.sqlite"))
    with pytest.raises(UndoError) as err:
        run(tiny_config(run_dir, tiny_student, **settings), teacher=teacher)
    line = str(err.value)
    assert "\n" not in line and "degenerate gap report" in line and "--allow_weak_gap_report" in line
    rd = RunDir(run_dir)
    quality = rd.marker_info(1, "data")["teacher_quality"]
    assert quality == {"requests": 12, "failed": 0, "unusable": 2, "unusable_after_retry": 0}
    rows = {r["id"]: r for r in read_jsonl(run_dir / "iter_1" / "data.jsonl")}
    assert all(rows[i]["teacher_text"].startswith("First draft.") for i in weak)
    assert not rd.is_done(2, "gaps") and not (run_dir / "iter_2" / "gaps.md").exists()

    again = WeakTeacher(weak, cache_path=str(tmp_path / "cache.sqlite"))
    state = run(tiny_config(run_dir, tiny_student, allow_weak_gap_report=True, **settings), teacher=again)
    assert state["iterations"] == 2
    assert [k for k, _ in again.requests].count("gaps") == 0  # both gap attempts were cached
    info = rd.marker_info(2, "gaps")
    assert info["weak_gap_report"].startswith("degenerate") and info["teacher_quality"]["unusable_after_retry"] == 1
    report = (run_dir / "report.md").read_text()
    assert "## Teacher answers" in report and "| 1 | data | 12 | 0 | 2 | 0 |" in report
    assert "| 2 | gaps | 1 | 0 | 1 | 1 |" in report and "degenerate gap report" in report
