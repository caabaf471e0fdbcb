"""The multi-process harness itself: a failing worker shows its log, a run past its deadline is killed."""

from __future__ import annotations

import time

import pytest

from tests.multihost.harness import WorkerFailure, WorkerRun, run_all


def test_a_failing_worker_fails_the_run_with_its_log(tmp_path):
    failure = run_all({"bad": {"num_processes": 2, "devices_per_process": 1, "steps": "train,bogus"}}, tmp_path,
                      timeout_s=120)["bad"]
    assert isinstance(failure, WorkerFailure)
    message = str(failure)
    assert "exited with [2" in message  # argparse's exit status
    assert "unknown step(s) bogus" in message
    assert "----- worker 0" in message and "----- worker 1" in message


def test_a_run_past_its_deadline_is_killed(tmp_path):
    run = WorkerRun(tmp_path, num_processes=2, devices_per_process=1, steps="train")
    with pytest.raises(WorkerFailure, match="did not finish in time"):
        run.wait(deadline=time.monotonic())  # already past: the workers are still importing JAX
    assert all(p.poll() is not None for p in run.procs)
    assert not list(tmp_path.glob("worker_*.json"))
