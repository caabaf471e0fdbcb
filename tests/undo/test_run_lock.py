"""One run per run directory: process 0 holds an fcntl lock on RUN/run.lock naming its host and pid. A second
`undo_jax.main` on the directory is refused with one line naming the holder and changes nothing; the lock of a
killed run is taken over. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from undo_jax.testing.servers import LoopbackServer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
HOLD = ("import sys, time; from undo_jax.undo.rundir import RunDir, RunLock; RunDir(sys.argv[1]).ensure_writable(); "
        "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)")


def main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "undo_jax.main", *args], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=600)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("undo_jax.main: error:")]


def test_a_held_lock_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=ENV, text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        student = tmp_path / "student"  # passes the cheap checks (config and tokenizer files), so the lock is next
        student.mkdir()
        (student / "config.json").write_text("{}")
        (student / "tokenizer.json").write_text("{}")
        args = [f"--run_dir={run_dir}", f"--student={student}", "--data_source=demo", "--val_size=8"]
        refused = main(*args)
        assert refused.returncode == 1
        (line,) = error_lines(refused)
        assert "in use by another run" in line and f"pid {holder.pid}" in line
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid  # the dead holder's record stays
    from undo_jax.preflight import lock_holder
    from undo_jax.undo.rundir import RunLock

    assert lock_holder(run_dir) is None  # the checks see no live holder
    lock = RunLock(run_dir)
    lock.acquire()  # and the lock is taken over, naming the dead holder (logged by the loop)
    assert lock.previous["pid"] == holder.pid
    lock.release()


@pytest.mark.slow
def test_two_concurrent_mains_the_second_is_refused_the_first_unharmed(tmp_path, tiny_student):
    from tests.undo.test_kill_resume import flag_lines, gold_replies

    run_dir = tmp_path / "run"
    with LoopbackServer("openai", replies=gold_replies(), latency=0.2) as server:
        args = [*flag_lines(run_dir, tiny_student, server.base_url), "--epochs_first=2", "--save_every=0"]
        first = subprocess.Popen([sys.executable, "-m", "undo_jax.main", *args], cwd=REPO, env=ENV, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            lock = run_dir / "run.lock"
            if lock.is_file() and lock.read_text() and json.loads(lock.read_text())["pid"] == first.pid:
                break
            time.sleep(0.2)
        second = main(*args)
        out, err = first.communicate(timeout=600)
    assert second.returncode == 1
    (line,) = error_lines(second)
    assert f"in use by another run (pid {first.pid}" in line
    assert first.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1])["iterations"] == 1
    assert (run_dir / "iter_1" / "eval_test.DONE").is_file()
