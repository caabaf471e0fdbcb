"""The whole UNDO loop as 2 CPU processes x 2 devices against 1 process x 4 devices (same global mesh).

Two iterations (teacher rationales, training, evaluation, gap report, rewrites, training, evaluation,
Hugging Face export of the best iteration) with a scripted teacher per process. Only process 0 may
ask its teacher anything: process 1 must get the teacher's data through the run directory. Both runs
must end with the same data, evaluation rows, metrics and exported weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.multihost.harness import WorkerFailure, run_all

pytestmark = pytest.mark.slow
RUN_FILES = ("iter_1/data.jsonl", "iter_1/eval_val.jsonl", "iter_1/eval_test.jsonl", "iter_2/gaps.md",
             "iter_2/data.jsonl", "iter_2/eval_val.jsonl", "iter_2/eval_test.jsonl", "metrics.jsonl")


@pytest.fixture(scope="module")
def undo_runs(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    from tests.undo.conftest import demo_rows, write_tiny_student

    root = tmp_path_factory.mktemp("multihost_undo")
    corpus = [f"{r['Body']} {r['Question']}" for r in demo_rows(420)]
    student = write_tiny_student(root / "student", corpus + ["Let's compute step by step.", "The answer is 12."])
    worker = {"module": "tests.multihost.undo_worker", "extra_args": ("--student", str(student))}
    results = run_all({"one_process": {"num_processes": 1, "devices_per_process": 4, **worker},
                       "two_processes": {"num_processes": 2, "devices_per_process": 2, **worker}}, root, timeout_s=600)
    for result in results.values():
        if isinstance(result, WorkerFailure):
            raise result
    return {name: (root / name / "run", reports) for name, reports in results.items()}


def test_only_process_zero_asks_the_teacher(undo_runs):
    _, one = undo_runs["one_process"]
    _, two = undo_runs["two_processes"]
    asked = one[0]["teacher_requests"]
    assert {"rationale", "gaps", "rewrite"} <= set(asked)
    assert two[0]["teacher_requests"] == asked
    assert two[1]["teacher_requests"] == []


def test_both_runs_end_alike(undo_runs):
    one_dir, one = undo_runs["one_process"]
    two_dir, two = undo_runs["two_processes"]
    assert one[0]["state"] == two[0]["state"] == two[1]["state"]
    for name in RUN_FILES:
        assert (one_dir / name).read_text() == (two_dir / name).read_text(), name
    losses = {d: [json.loads(line).get("loss") for line in (d / "iter_2" / "train_log.jsonl").read_text().splitlines()]
              for d in (one_dir, two_dir)}
    assert [x is None for x in losses[one_dir]] == [x is None for x in losses[two_dir]]
    np.testing.assert_allclose([x for x in losses[one_dir] if x is not None],
                               [x for x in losses[two_dir] if x is not None], rtol=0, atol=1e-5)


def test_the_exports_hold_the_same_weights(undo_runs):
    from safetensors.numpy import load_file

    one = load_file(undo_runs["one_process"][0] / "final" / "model.safetensors")
    two = load_file(undo_runs["two_processes"][0] / "final" / "model.safetensors")
    assert sorted(one) == sorted(two)
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-5, err_msg=name)
