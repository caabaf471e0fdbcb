"""--distill=logits through the UNDO loop: a teacher-logit stage per iteration, cached, reported, checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.undo.conftest import demo_rows, tiny_config, write_tiny_student
from undo_jax.configtree import ConfigError, to_flag_lines
from undo_jax.undo import RunDir, run
from undo_jax.undo.prepare import UndoError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def logit_teacher(tmp_path_factory):
    # Same corpus as the tiny student, so the same BPE vocabulary; other random weights.
    rows = demo_rows(420)
    corpus = [f"{r['Body']} {r['Question']}" for r in rows]
    corpus += ["Let's compute step by step.", "The answer is 12.", "Solve the problem step by step."]
    return write_tiny_student(tmp_path_factory.mktemp("teacher") / "tiny_teacher", corpus, seed=5)


def test_logit_distillation_runs_caches_and_reports(tiny_student, logit_teacher, tmp_path):
    run_dir = tmp_path / "kd"
    cfg = tiny_config(run_dir, tiny_student, distill="logits", logit_teacher=str(logit_teacher), kd_top_k=8,
                      kd_alpha=0.5, kd_divergence="reverse_kl", max_iterations=2)
    run(cfg)
    rd = RunDir(run_dir)
    for k in (1, 2):
        info = rd.marker_info(k, "teacher_logits")
        assert info is not None and info["computed"] + info["reused"] > 0 and info["top_k"] == 8
        assert rd.marker_info(k, "train")["distill"] == "logits"
    assert rd.marker_info(1, "teacher_logits")["computed"] > 0
    shards = sorted((run_dir / "teacher_logits").rglob("shard-*.npz"))
    assert shards
    report = (run_dir / "report.md").read_text()
    assert f"logits of `{logit_teacher}` (top-8, reverse_kl, alpha 0.5, T 1.0)" in report
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| iteration | eval_train"))
    assert lines[at].split(" | ")[4] == "teacher_logits"  # the stage's seconds are in the time table
    seconds = f"{rd.marker_info(1, 'teacher_logits')['seconds']:.1f}"
    assert lines[at + 3].startswith("| 1 | ") and lines[at + 3].split(" | ")[4] == seconds  # after iteration 0
    records = [json.loads(line) for line in (run_dir / "iter_1" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(x > 0 for x in losses)

    # Redo iteration 1's teacher pass: every example is served from the store, nothing is recomputed.
    (run_dir / "iter_1" / "teacher_logits.DONE").unlink()
    run(cfg)
    again = rd.marker_info(1, "teacher_logits")
    assert again["computed"] == 0 and again["reused"] == rd.marker_info(1, "train")["examples"]
    assert sorted((run_dir / "teacher_logits").rglob("shard-*.npz")) == shards


def test_a_teacher_with_another_vocabulary_is_one_line(tiny_student, tmp_path):
    other = write_tiny_student(tmp_path / "other_vocab", ["completely different words only", "zebra quilt"], seed=1)
    cfg = tiny_config(tmp_path / "bad", tiny_student, distill="logits", logit_teacher=str(other), max_iterations=1)
    with pytest.raises(UndoError, match="logit distillation needs one vocabulary") as info:
        run(cfg)
    assert str(other) in str(info.value) and "\n" not in str(info.value)


def test_distill_flags_are_checked_on_the_tree(tiny_student, tmp_path):
    with pytest.raises(ConfigError, match="--logit_teacher: is required with --distill=logits"):
        tiny_config(tmp_path / "a", tiny_student, distill="logits")
    with pytest.raises(ConfigError, match=re.escape("--logit_teacher: applies to --distill=logits|on_policy only")):
        tiny_config(tmp_path / "b", tiny_student, logit_teacher=str(tiny_student))


def test_on_policy_distillation_samples_scores_and_reports(tiny_student, logit_teacher, tmp_path):
    run_dir = tmp_path / "gkd"
    # 8 examples, batch 8: 1 step per epoch, 2 epochs; every step on-policy.
    overrides = dict(distill="on_policy", logit_teacher=str(logit_teacher), kd_top_k=8, kd_divergence="jsd",
                     on_policy_fraction=1.0, on_policy_temperature=0.7, on_policy_max_new_tokens=8, max_iterations=1,
                     train_size=8, eval_base=False)
    cfg = tiny_config(run_dir, tiny_student, **overrides)
    # Through the command line, as a user runs it, in a fresh process (the suite's process has compiled a thousand
    # programs by now: once, XLA crashed compiling this run's step there, and never in a process of its own).
    proc = subprocess.run([sys.executable, "-m", "undo_jax.main", *to_flag_lines(cfg)], cwd=REPO, text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rd = RunDir(run_dir)
    assert rd.marker_info(1, "teacher_logits")["computed"] > 0  # off-policy targets are cached as with logits
    assert rd.marker_info(1, "train")["distill"] == "on_policy"
    records = [json.loads(line) for line in (run_dir / "iter_1" / "train_log.jsonl").read_text().splitlines()][1:]
    assert len(records) == 2 and all(r["on_policy"] for r in records)
    # Each step's completions are the student's samples: at most 8 tokens each, 8 examples per step.
    assert all(0 < r["sampled_tokens"] <= 8 * 8 and r["completion_tokens"] == r["sampled_tokens"] for r in records)
    report = (run_dir / "report.md").read_text()
    assert "on-policy on 1.0 of the steps (student samples at T 0.7, up to 8 tokens)" in report


def test_on_policy_flags_need_on_policy_distillation(tiny_student, logit_teacher, tmp_path):
    with pytest.raises(ConfigError, match="--on_policy_fraction: applies to --distill=on_policy only, not "
                                          "--distill=logits"):
        tiny_config(tmp_path / "a", tiny_student, distill="logits", logit_teacher=str(logit_teacher),
                    on_policy_fraction=0.2)
    with pytest.raises(ConfigError, match="--logit_teacher: is required with --distill=on_policy"):
        tiny_config(tmp_path / "b", tiny_student, distill="on_policy")
