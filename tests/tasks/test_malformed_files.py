"""Task loaders on malformed files (no shared data needed): one-line TaskDataError naming the file and the place."""

from __future__ import annotations

import json
import re

import pytest

from undo_jax.tasks import TaskDataError, get_task
from undo_jax.teachers import make_teacher
from undo_jax.undo import prompts


def svamp_row(i: int, equation: str | None = None) -> dict:
    a, b = i + 2, i % 7 + 1
    return {"ID": f"chal-{i}", "Body": f"Ann has {a} apples and gets {b} more.", "Question": "How many now?",
            "Equation": equation or f"( {a}.0 + {b}.0 )", "Answer": a + b, "Type": "Addition"}


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("payload, where", [
    ({"rows": [1]}, "expected a JSON array of objects"),           # an object without a "data" list
    ("just a string", "expected a JSON array of objects"),
    ([svamp_row(0), 7], "item 1: expected a JSON object, got int"),
    ([svamp_row(0), ["ID", "x"]], "item 1: expected a JSON object, got list"),
])
def test_json_that_is_not_a_list_of_objects(tmp_path, payload, where):
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(TaskDataError, match=f"{path}: {where}") as e:
        get_task("svamp").load("test", path)
    one_line(e)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps([1, 2]) + "\n")
    with pytest.raises(TaskDataError, match=f"{path}:2: expected a JSON object, got list") as e:
        get_task("gsm8k").load("train", path, val_size=0)
    one_line(e)


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not a parquet file", b"\x00" * 64])
def test_unreadable_parquet(tmp_path, content):
    path = tmp_path / "test-00000-of-00001.parquet"
    path.write_bytes(content)
    with pytest.raises(TaskDataError, match=f"{path}: cannot read parquet") as e:
        get_task("mmlu_pro").load("test", tmp_path)
    one_line(e)
    assert path.read_bytes() == content  # never touched


def test_svamp_file_too_small_to_split(tmp_path):
    path = tmp_path / "svamp.jsonl"
    path.write_text("".join(json.dumps(svamp_row(i)) + "\n" for i in range(300)))  # the fixed test split alone is 300
    with pytest.raises(TaskDataError, match=f"{path}: 300 SVAMP records, need more than 300 to split") as e:
        get_task("svamp").load("train", path)
    one_line(e)


def test_train_pool_too_small_for_the_validation_carve(tmp_path):
    path = tmp_path / "svamp.jsonl"
    path.write_text("".join(json.dumps(svamp_row(i)) + "\n" for i in range(310)))  # 10 left after the test split
    with pytest.raises(ValueError, match=r"val_size=10 must be in \[0, 10\) for task svamp"):
        get_task("svamp").load("validation", path, val_size=10)
    assert len(get_task("svamp").load("validation", path, val_size=9)) == 9


@pytest.mark.parametrize("equation, message, node", [
    ("( 2.0 ** 3.0 )", "unsupported element", "BinOp"),
    ("( apples + 3.0 )", "unsupported element", "Name"),
    ("( 4.0 / 0.0 )", "divides by zero", None),
    ("( 4.0 + )", "is not an arithmetic expression", None),
])
def test_svamp_equation_the_reference_teacher_cannot_render(tmp_path, equation, message, node):
    # The loader keeps the equation as text; the reference teacher, which renders it as worked steps, fails that
    # one request with a one-line error naming the equation and answers the others.
    from undo_jax.tasks.svamp import evaluate_equation

    path = tmp_path / "svamp.jsonl"
    path.write_text("".join(json.dumps(svamp_row(i, equation if i == 0 else None)) + "\n" for i in range(320)))
    task = get_task("svamp")
    everything = task.load("train", path, val_size=0) + task.load("test", path)
    records = [r for r in everything if r.id in ("chal-0", "chal-1")]
    assert sorted(r.id for r in records) == ["chal-0", "chal-1"]
    settings = {"temperature": 0.0, "max_output_tokens": 64}
    teacher = make_teacher("reference")
    responses = teacher.generate([prompts.rationale_request(task, r, settings) for r in records])
    by_id = {r.id: (r, resp) for r, resp in zip(records, responses, strict=True)}
    bad, good = by_id["chal-0"][1], by_id["chal-1"]
    assert bad.texts == [] and message in bad.error and equation in bad.error and "\n" not in bad.error
    assert good[1].error is None and task.is_correct(task.extract_answer(good[1].texts[0]), good[0])
    if message == "unsupported element":
        # One writer of SVAMP steps (the task's): its message names the equation and the element it cannot do.
        with pytest.raises(ValueError, match=rf"^SVAMP equation {re.escape(repr(equation))}: unsupported element "
                                             rf"{node}\(") as e:
            evaluate_equation(equation)
        assert "\n" not in str(e.value)
