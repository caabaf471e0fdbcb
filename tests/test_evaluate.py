"""`undo_jax.evaluate`: scores a student on a task split, agreeing with the sampler and the task's scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.undo.conftest import demo_rows, write_tiny_student
from undo_jax.config import eval_command
from undo_jax.undo.rundir import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    corpus = [f"{r['Body']} {r['Question']}" for r in demo_rows(420)] + ["The answer is 7."]
    return write_tiny_student(tmp_path_factory.mktemp("student") / "tiny", corpus, seed=3)


def test_evaluate_matches_generate_and_task_score(student, tmp_path):
    from undo_jax.config import demo_data_path
    from undo_jax.evaluate import evaluate
    from undo_jax.models import load_pretrained, load_tokenizer
    from undo_jax.sampling import generate
    from undo_jax.tasks import get_task

    out = tmp_path / "eval" / "rows.jsonl"
    cfg = eval_command(student=str(student), task="svamp", split="test", eval_out=str(out), data_source="demo",
                     test_size=10, max_new_tokens=10, eval_batch_size=8, eval_chunk=4)
    summary = evaluate(cfg)
    rows = read_jsonl(out)
    task = get_task("svamp")
    records = task.load("test", demo_data_path())[:10]
    assert [r["id"] for r in rows] == [r.id for r in records]
    # Reference: the sampler called directly on the same prompts, chunk by chunk, greedy.
    model, tok = load_pretrained(str(student)), load_tokenizer(str(student))
    expected = []
    for start in range(0, 10, 4):
        chunk = records[start:start + 4]
        outs = generate(model, tok, [task.prompt_messages(r) for r in chunk], max_new_tokens=10, batch_size=8)
        expected += [o[0].text for o in outs]
    assert [r["completion"] for r in rows] == expected
    assert summary["accuracy"] == task.score(expected, records)["accuracy"]
    assert json.loads((tmp_path / "eval" / "rows.summary.json").read_text())["n"] == 10


@pytest.mark.slow
def test_cli_scores_and_bad_student_is_one_line(student, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "cli.jsonl"
    args = [sys.executable, "-m", "undo_jax.evaluate", "--task=svamp", "--split=validation", "--data_source=demo",
            "--val_size=6", "--max_new_tokens=6", f"--eval_out={out}"]
    ok = subprocess.run([*args, f"--student={student}"], cwd=REPO, env=env, text=True, capture_output=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    printed = json.loads(ok.stdout.strip().splitlines()[-1])
    assert printed["n"] == 6 and printed["split"] == "validation"
    assert len(read_jsonl(out)) == 6
    bad = subprocess.run([*args, f"--student={tmp_path / 'nothing'}"], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
    assert bad.returncode == 1
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("undo_jax.evaluate: error:")]
    assert len(errors) == 1 and "nothing" in errors[0]


def test_maj_k_votes_over_samples(student, tmp_path):
    from undo_jax.evaluate import evaluate
    from undo_jax.sampling import majority_vote
    from undo_jax.tasks import get_task

    out = tmp_path / "maj.jsonl"
    cfg = eval_command(student=str(student), task="svamp", split="test", eval_out=str(out), data_source="demo",
                     test_size=4, max_new_tokens=8, maj_k=3, eval_temperature=1.0, eval_chunk=4, eval_batch_size=12)
    evaluate(cfg)
    task = get_task("svamp")
    for row in read_jsonl(out):
        assert len(row["samples"]) == 3
        answer, index = majority_vote(row["samples"], task.vote_key)
        assert row["prediction"] == answer and row["completion"] == row["samples"][index]
