"""kill -9 inside teacher generation, training and evaluation, then re-run: the run ends exactly like an
uninterrupted one (same data, same evaluation rows, same metrics), and the teacher server never answered
any prompt twice.

The run is a real subprocess (`python -m undo_jax.main --flagfile=...`); the teacher is the OpenAI-protocol
loopback server in this process (replies scripted per prompt with gold rationales, latency so that a kill
lands between answers); the kill point is observed from outside, in the run directory.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from undo_jax.config import demo_data_path
from undo_jax.tasks import get_task
from undo_jax.teachers.reference import reference_rationale
from undo_jax.testing.servers import LoopbackServer
from undo_jax.undo import prompts
from undo_jax.undo.rundir import read_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"temperature": 0.0, "max_output_tokens": 256}


def flag_lines(run_dir: Path, student: Path, base_url: str) -> list[str]:
    return [f"--run_dir={run_dir}", f"--student={student}", "--data_source=demo", "--val_size=8",
            "--train_size=24", "--test_size=16", "--epochs_first=6", "--epochs_later=1", "--lr=1e-3",
            "--warmup_ratio=0", "--batch_size=8", "--micro_batch=8", "--max_length=256", "--save_every=2",
            "--max_new_tokens=24", "--eval_batch_size=8", "--eval_chunk=4", "--max_iterations=1", "--noeval_base",
            "--teacher=openai", "--teacher_model=loopback", f"--teacher_base_url={base_url}",
            "--teacher_concurrency=1", "--teacher_max_output_tokens=256"]


def gold_replies() -> dict[str, str]:
    """Prompt -> reply: the teacher answers every rationale request with the question's gold rationale."""
    task = get_task("svamp")
    replies = {}
    for split in ("train", "validation"):
        for record in task.load(split, demo_data_path(), val_size=8):
            prompt = prompts.rationale_request(task, record, SETTINGS).messages[-1]["content"]
            replies[prompt] = reference_rationale(task, record)
    return replies


def start(run_dir: Path, student: Path, server: LoopbackServer) -> subprocess.Popen:
    flagfile = run_dir.parent / f"{run_dir.name}.cfg"
    flagfile.write_text("\n".join(flag_lines(run_dir, student, server.base_url)) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "undo_jax.main", f"--flagfile={flagfile}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{err[-3000:]}"


def kill_when(proc: subprocess.Popen, condition, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before the kill point:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def cached_rows(run_dir: Path) -> int:
    path = run_dir / "teacher_cache.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.Error:
        return 0


def outcome(run_dir: Path) -> dict:
    return {"metrics": read_jsonl(run_dir / "metrics.jsonl"),
            "data": read_jsonl(run_dir / "iter_1" / "data.jsonl"),
            "eval_val": read_jsonl(run_dir / "iter_1" / "eval_val.jsonl"),
            "eval_test": read_jsonl(run_dir / "iter_1" / "eval_test.jsonl"),
            "final_iteration": (run_dir / "final" / "undo_export.json").read_text()}


@pytest.fixture(scope="module")
def replies():
    return gold_replies()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_student, replies):
    run_dir = tmp_path_factory.mktemp("kill") / "reference"
    with LoopbackServer("openai", replies=replies) as server:
        finish(start(run_dir, tiny_student, server))
    return outcome(run_dir)


def assert_same_and_no_repeats(run_dir: Path, uninterrupted: dict, server: LoopbackServer,
                               lost_in_flight: int = 0) -> None:
    """Same outcome; every prompt answered once, except answers the kill cut off before they were stored."""
    assert outcome(run_dir) == uninterrupted
    completed = server.stats()["completed"]
    assert len(completed) == 24 + 8
    repeats = sum(n - 1 for n in completed.values())
    assert repeats == lost_in_flight, f"{repeats} prompts answered twice; {lost_in_flight} were lost in the kill"


def test_kill_during_teacher_generation(tmp_path, tiny_student, replies, uninterrupted):
    run_dir = tmp_path / "run"
    # One request at a time, 0.5 s per answer: the kill lands while the next request waits for its answer.
    # The server still counts that answer as sent (its write then fails: the client is gone), so the one
    # request in flight is the only one that may be asked again; nothing that was received and stored is.
    with LoopbackServer("openai", replies=replies, latency=0.5) as server:
        proc = start(run_dir, tiny_student, server)
        kill_when(proc, lambda: cached_rows(run_dir) >= 10)
        assert not (run_dir / "iter_1" / "data.DONE").exists()
        time.sleep(1.5)  # let the server finish the request that was in flight
        answered, stored = server.stats()["total_completed"], cached_rows(run_dir)
        assert 10 <= stored <= answered <= stored + 1 < 32
        finish(start(run_dir, tiny_student, server))
        assert_same_and_no_repeats(run_dir, uninterrupted, server, lost_in_flight=answered - stored)


def test_kill_during_training(tmp_path, tiny_student, replies, uninterrupted):
    run_dir = tmp_path / "run"
    log = run_dir / "iter_1" / "train_log.jsonl"

    def mid_training() -> bool:
        return log.exists() and len(log.read_text().splitlines()) >= 5  # start line + 4 steps (a checkpoint at 2, 4)

    with LoopbackServer("openai", replies=replies) as server:
        proc = start(run_dir, tiny_student, server)
        kill_when(proc, mid_training)
        assert not (run_dir / "iter_1" / "train.DONE").exists()
        finish(start(run_dir, tiny_student, server))
        assert_same_and_no_repeats(run_dir, uninterrupted, server)
    steps = [r["step"] for r in read_jsonl(log) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # the resumed log continues, without gaps or repeats


def test_kill_during_evaluation(tmp_path, tiny_student, replies, uninterrupted):
    run_dir = tmp_path / "run"
    partial = run_dir / "iter_1" / "eval_test.partial.jsonl"
    with LoopbackServer("openai", replies=replies) as server:
        proc = start(run_dir, tiny_student, server)
        kill_when(proc, lambda: partial.exists() and partial.stat().st_size > 0)
        assert not (run_dir / "iter_1" / "eval_test.DONE").exists()
        finish(start(run_dir, tiny_student, server))
        assert_same_and_no_repeats(run_dir, uninterrupted, server)
