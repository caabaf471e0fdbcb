"""Nothing is lost when the teacher fails: real `undo_jax.main` processes against the OpenAI-protocol loopback
server. 30% of the training prompts are refused (HTTP 400, not retried) during the first attempt: the run stops
with one line naming --max_teacher_failures and leaves the data stage unfinished; the server then recovers and
the re-run asks exactly the refused prompts again (the rest are cache hits), ending with the same data set and
the same metrics as a clean run. With --max_teacher_failures above the failure rate the run goes on and its
report lists the lost questions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.undo.test_kill_resume import REPO, SETTINGS, flag_lines, gold_replies
from undo_jax.config import demo_data_path
from undo_jax.tasks import get_task
from undo_jax.testing.servers import LoopbackServer
from undo_jax.undo import prompts
from undo_jax.undo.rundir import read_jsonl

pytestmark = pytest.mark.slow


def run_main(run_dir: Path, student: Path, server: LoopbackServer, *extra: str) -> subprocess.CompletedProcess:
    args = [*flag_lines(run_dir, student, server.base_url), "--epochs_first=2", "--save_every=0", *extra]
    return subprocess.run([sys.executable, "-m", "undo_jax.main", *args], cwd=REPO, text=True, capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)


def refused_prompts() -> dict[str, list[str]]:
    task = get_task("svamp")
    train = task.load("train", demo_data_path(), val_size=8)[:24]
    chosen = [r for i, r in enumerate(train) if i % 10 < 3]  # 30% of the training questions
    return {prompts.rationale_request(task, r, SETTINGS).messages[-1]["content"]: ["400"] for r in chosen}


def test_failed_requests_are_retried_by_the_rerun_and_nothing_is_lost(tmp_path, tiny_student):
    replies = gold_replies()
    with LoopbackServer("openai", replies=replies) as clean_server:
        clean = run_main(tmp_path / "clean", tiny_student, clean_server)
    assert clean.returncode == 0, clean.stderr[-2000:]

    refused = refused_prompts()
    with LoopbackServer("openai", replies=replies, script={p: list(q) for p, q in refused.items()}) as server:
        first = run_main(tmp_path / "run", tiny_student, server)
        assert first.returncode == 1
        errors = [ln for ln in first.stderr.splitlines() if ln.startswith("undo_jax.main: error:")]
        assert len(errors) == 1 and f"{len(refused)} of 32 teacher requests failed" in errors[0]
        assert "--max_teacher_failures=0" in errors[0]
        assert not (tmp_path / "run" / "iter_1" / "data.DONE").exists()
        # The server has recovered (each refusal was scripted for one attempt): the re-run completes.
        second = run_main(tmp_path / "run", tiny_student, server)
        assert second.returncode == 0, second.stderr[-2000:]
        counts = server.stats()["counts"]
    assert len(counts) == 32 and set(refused) <= set(counts)
    for prompt, n in counts.items():
        assert n == (2 if prompt in refused else 1), "a prompt was re-sent although answered"
    assert read_jsonl(tmp_path / "run" / "iter_1" / "data.jsonl") == read_jsonl(tmp_path / "clean" / "iter_1" /
                                                                                 "data.jsonl")
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(tmp_path / "clean" / "metrics.jsonl")
    assert (read_jsonl(tmp_path / "run" / "iter_1" / "eval_test.jsonl")
            == read_jsonl(tmp_path / "clean" / "iter_1" / "eval_test.jsonl"))


def test_failures_under_the_threshold_go_on_and_are_reported(tmp_path, tiny_student):
    refused = refused_prompts()
    with LoopbackServer("openai", replies=gold_replies(), script={p: list(q) for p, q in refused.items()}) as server:
        proc = run_main(tmp_path / "run", tiny_student, server, "--max_teacher_failures=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_jsonl(tmp_path / "run" / "iter_1" / "data.jsonl")
    failed = [r["id"] for r in rows if r["error"]]
    assert len(failed) == len(refused) and all(not r["kept"] for r in rows if r["error"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Teacher answers" in report and f"| 1 | data | 32 | {len(refused)} |" in report
    assert all(f"`{i}`" in report for i in failed)
