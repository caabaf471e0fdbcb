"""The reference teacher: exact SVAMP worked steps, gold rationales, and 100% with the task scorers."""

from __future__ import annotations

from fractions import Fraction

import pytest

from undo_jax.tasks import get_task
from undo_jax.tasks.svamp import equation_steps
from undo_jax.tasks.svamp import exact_number_text as format_number
from undo_jax.teachers import TeacherRequest, make_teacher
from undo_jax.teachers.reference import reference_rationale


def test_equation_steps_innermost_first_exact():
    assert equation_steps("( 76.0 - 25.0 )") == (["76 - 25 = 51."], Fraction(51))
    steps, value = equation_steps("( ( 5.0 + 3.0 ) - ( 2.0 * 1.5 ) )")
    assert steps == ["5 + 3 = 8.", "2 * 1.5 = 3.", "8 - 3 = 5."] and value == 5
    steps, value = equation_steps("( ( 10.0 / 4.0 ) * 3.0 )")
    assert steps == ["10 / 4 = 2.5.", "2.5 * 3 = 7.5."] and value == Fraction(15, 2)
    # 0.1 + 0.2 in binary floats is 0.30000000000000004; the steps are exact.
    assert equation_steps("( 0.1 + 0.2 )")[0] == ["0.1 + 0.2 = 0.3."]
    assert equation_steps("20.0") == ([], Fraction(20))
    with pytest.raises(ValueError, match="divides by zero"):
        equation_steps("( 1.0 / 0.0 )")
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        equation_steps("( 1.0 + ")


def test_format_number():
    assert [format_number(Fraction(x)) for x in ("3", "-2", "5/2", "1/8", "1/3", "-7/4")] == [
        "3",
        "-2",
        "2.5",
        "0.125",
        "1/3",
        "-1.75",
    ]


def test_gsm8k_rationale_drops_calculator_notes_and_final_line():
    from undo_jax.tasks import Record

    record = Record(id="train/0", question="q", answer="72", meta={}, rationale=(
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"))
    assert reference_rationale(get_task("gsm8k"), record) == (
        "Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\nThe answer is 72."
    )


def test_gap_requests_and_metadata_state_that_gap_reports_are_ignored():
    teacher = make_teacher("reference")
    out = teacher.generate(
        [
            TeacherRequest([{"role": "user", "content": "analyse gaps"}], context={"kind": "gaps"}),
            TeacherRequest([{"role": "user", "content": "no context"}]),
        ]
    )
    assert out[0].error is None and "ignores gap reports" in out[0].texts[0]
    assert out[0].metadata["ignores_gap_reports"] is True and "reference" in out[0].metadata["label"]
    assert out[1].error and "needs request.context" in out[1].error and out[1].texts == []
    teacher.close()


# (task name, split, folder) for every dataset under ../shared/data; validation is carved from train.
DATASETS = [
    ("svamp", "train", "svamp"),
    ("svamp", "test", "svamp"),
    ("gsm8k", "train", "gsm8k"),
    ("gsm8k", "test", "gsm8k"),
    ("math", "train", "math"),
    ("math", "test", "math"),
    ("math500", "test", "math"),
    ("mmlu_pro", "train", "mmlu_pro"),
    ("mmlu_pro", "test", "mmlu_pro"),
]
# Records the gold data itself cannot score (documented in BUILD_NOTES.md). The two MATH
# train problems with an empty \boxed{} upstream would be here, but the math task already drops them.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


@pytest.mark.parametrize("task_name,split,folder", DATASETS)
def test_reference_rationales_score_100_percent(shared_data, task_name, split, folder):
    tasks = pytest.importorskip("undo_jax.tasks")
    task = tasks.get_task(task_name)
    records = task.load(split, shared_data / folder, val_size=0 if split == "test" else 200)
    if split == "train":
        records = records + task.load("validation", shared_data / folder)
    teacher = make_teacher("reference")
    out = teacher.generate(
        [
            TeacherRequest(task.prompt_messages(r), context={"kind": "rationale", "task": task_name, "record": r})
            for r in records
        ]
    )
    teacher.close()
    assert all(r.error is None for r in out), next(r.error for r in out if r.error)
    keep = [k for k, r in enumerate(records) if (task_name, r.id) not in KNOWN_EXCEPTIONS]
    score = task.score([out[k].texts[0] for k in keep], [records[k] for k in keep])
    wrong = [records[k].id for k in keep if not task.is_correct(task.extract_answer(out[k].texts[0]), records[k])]
    assert score["accuracy"] == 1.0, (score["correct"], score["n"], wrong[:5])
    assert len(records) - len(keep) <= len(KNOWN_EXCEPTIONS)
    assert score["n"] >= 200
