"""End to end, in process: a tiny random student, the scripted teacher (rationales change after a gap report),
two UNDO iterations; then a re-run that must recompute nothing, and (slow) the standard baseline beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.undo.conftest import number, tiny_config
from tests.undo.scripted_teacher import GAP_MARKER, ScriptedTeacher
from undo_jax.undo import RunDir, run
from undo_jax.undo.rundir import read_jsonl

STAGES = {0: ["eval_val", "eval_test"], 1: ["data", "train", "eval_val", "eval_test"],
          2: ["gaps", "data", "train", "eval_val", "eval_test"]}


def test_every_stage_ran_and_left_its_outputs(undo_run):
    run_dir, _, state = undo_run
    rd = RunDir(run_dir)
    for k, stages in STAGES.items():
        for stage in stages:
            assert rd.is_done(k, stage), f"iter_{k}/{stage}.DONE missing"
            assert rd.marker_info(k, stage)["seconds"] >= 0
    # --keep_train_state=last (the default): the optimizer state of the last iteration only, params of every one.
    assert sorted(p.name for p in (run_dir / "iter_1" / "checkpoint").iterdir()) == ["model.json", "params"]
    assert (run_dir / "iter_2" / "checkpoint" / "state").is_dir()
    for k in (1, 2):
        log = read_jsonl(run_dir / f"iter_{k}" / "train_log.jsonl")
        assert [r["step"] for r in log if "loss" in r] == list(range(1, len(log)))
        for split, n in (("val", 8), ("test", 16)):
            rows = read_jsonl(run_dir / f"iter_{k}" / f"eval_{split}.jsonl")
            assert len(rows) == n and {"completion", "prediction", "correct", "answer"} <= set(rows[0])
            assert not (run_dir / f"iter_{k}" / f"eval_{split}.partial.jsonl").exists()
    assert state["iterations"] == 2 and state["stop_reason"].startswith("reached --max_iterations")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [(m["iteration"], m["epochs"]) for m in metrics] == [(0, 0), (1, 2), (2, 3)]


def test_training_lowers_the_loss(undo_run):
    run_dir, _, _ = undo_run
    losses = [r["loss"] for r in read_jsonl(run_dir / "iter_1" / "train_log.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]


def test_first_iteration_drops_wrong_rationales(undo_run):
    run_dir, _, _ = undo_run
    rows = read_jsonl(run_dir / "iter_1" / "data.jsonl")
    assert len(rows) == 24
    for r in rows:
        assert r["teacher_text"].startswith("First draft.")
        assert r["kept"] == (number(r["id"]) % 4 != 0)  # the scripted teacher is wrong on every 4th
        assert (r["rationale"] is None) == (not r["kept"])
    assert read_jsonl(run_dir / "metrics.jsonl")[1]["train_examples"] == sum(r["kept"] for r in rows)


def test_gap_report_drives_the_rewrites(undo_run):
    run_dir, teacher, _ = undo_run
    gaps = (run_dir / "iter_2" / "gaps.md").read_text()
    assert GAP_MARKER in gaps
    failures = [r for r in read_jsonl(run_dir / "iter_1" / "eval_val.jsonl") if not r["correct"]]
    assert f"wrong on {min(5, len(failures))} shown problems" in gaps
    kinds = [k for k, _ in teacher.requests]
    assert kinds.count("gaps") == 1 and kinds.count("rewrite") == 24
    gap_prompt = next(p for k, p in teacher.requests if k == "gaps")
    own = {r["id"]: r["teacher_text"] for r in read_jsonl(run_dir / "iter_1" / "val_rationales.jsonl")}
    assert own[failures[0]["id"]].strip() in gap_prompt  # the teacher sees its own earlier solution
    assert all(GAP_MARKER in p for k, p in teacher.requests if k == "rewrite")

    previous = {r["id"]: r for r in read_jsonl(run_dir / "iter_1" / "data.jsonl")}
    for r in read_jsonl(run_dir / "iter_2" / "data.jsonl"):
        if number(r["id"]) % 3 == 0:  # wrong rewrite: the previous rationale stays
            assert r["origin"] == "previous" and r["rationale"] == previous[r["id"]]["rationale"]
        else:
            assert r["origin"] == "rewrite" and r["rationale"].startswith("Revised after gap report")
            assert r["rationale"] != previous[r["id"]]["rationale"]


def test_report_plot_and_ledger(undo_run):
    run_dir, _, _ = undo_run
    report = (run_dir / "report.md").read_text()
    for needle in ("| base | 0 |", "| 1 | 2 |", "| 2 | 3 |", "scripted/v1", "Time per stage", "iter_2/gaps.md"):
        assert needle in report
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calls = 24 + 8 + 1 + 24  # rationales (train + validation), one gap report, rewrites
    assert f"| scripted/v1 | {calls} | 0 |" in report


def test_final_is_the_best_student_and_transformers_loads_it(undo_run):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from undo_jax.undo.student import load_student

    run_dir, _, state = undo_run
    info = json.loads((run_dir / "final" / "undo_export.json").read_text())
    assert info["iteration"] == state["best_iteration"]
    ours, tok = load_student(str(run_dir / f"iter_{state['best_iteration']}"))
    ids = tok("Ann has 3 apples.", return_tensors="np")["input_ids"]
    expected = np.asarray(ours(ids))
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_rerun_recomputes_nothing(undo_run, tiny_student):
    run_dir, _, state = undo_run
    rd = RunDir(run_dir)
    before = {(k, s): rd.marker_info(k, s)["finished_unix"] for k, ss in STAGES.items() for s in ss}
    teacher = ScriptedTeacher(cache_path=str(run_dir.parent / "cache.sqlite"))
    again = run(tiny_config(run_dir, tiny_student), teacher=teacher)
    assert again == state
    assert teacher.requests == []
    assert {(k, s): rd.marker_info(k, s)["finished_unix"] for k, ss in STAGES.items() for s in ss} == before


@pytest.mark.slow
def test_standard_baseline_beside_undo(undo_run, tiny_student, tmp_path):
    from undo_jax.undo.report import write_report

    run_dir, _, _ = undo_run
    std_dir = tmp_path / "standard"
    state = run(tiny_config(std_dir, tiny_student, mode="standard", epsilon=100.0), teacher=ScriptedTeacher())
    assert state["iterations"] == 2  # standard mode never stops early (it must cover UNDO's epochs)
    first = read_jsonl(std_dir / "iter_1" / "data.jsonl")
    second = read_jsonl(std_dir / "iter_2" / "data.jsonl")
    assert [r["rationale"] for r in second] == [r["rationale"] for r in first]
    assert not (std_dir / "iter_2" / "gaps.md").exists()
    assert [m["epochs"] for m in read_jsonl(std_dir / "metrics.jsonl")] == [0, 2, 3]
    write_report(RunDir(run_dir), baseline_dir=str(std_dir))
    report = (run_dir / "report.md").read_text()
    assert "standard validation %" in report
    std_metrics = read_jsonl(std_dir / "metrics.jsonl")
    line = next(ln for ln in report.splitlines() if ln.startswith("| 2 | 3 |"))
    assert line.rstrip().endswith(f"{100 * std_metrics[2]['val_accuracy']:.1f} | "
                                  f"{100 * std_metrics[2]['test_accuracy']:.1f} |")


def test_corrupt_checkpoint_is_one_line_and_the_run_recovers(undo_run, tiny_student, tmp_path):
    import shutil

    from undo_jax.undo import StudentError

    src, _, state = undo_run
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    for name in ("eval_val", "eval_test"):
        (run_dir / "iter_2" / f"{name}.DONE").unlink()
    for f in (run_dir / "iter_2" / "checkpoint").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)
    with pytest.raises(StudentError, match="iter_2/checkpoint.*move iter_2/checkpoint") as e:
        run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher())
    assert "\n" not in str(e.value)
    assert (run_dir / "iter_2" / "data.jsonl").is_file() and RunDir(run_dir).is_done(2, "train")
    # Recovery as the message suggests: move the checkpoint away and retrain that iteration.
    (run_dir / "iter_2" / "checkpoint").rename(run_dir / "iter_2" / "checkpoint.corrupt")
    (run_dir / "iter_2" / "train.DONE").unlink()
    assert run(tiny_config(run_dir, tiny_student), teacher=ScriptedTeacher()) == state
    assert read_jsonl(run_dir / "iter_2" / "eval_test.jsonl") == read_jsonl(src / "iter_2" / "eval_test.jsonl")


@pytest.mark.slow
def test_transfer_trains_another_student_on_refined_data(undo_run, tmp_path):
    from tests.undo.conftest import demo_rows, write_tiny_student

    run_dir, _, _ = undo_run
    other = write_tiny_student(tmp_path / "other", [f"{r['Body']} {r['Question']}" for r in demo_rows(420)], seed=5)
    target = tmp_path / "transfer"
    teacher = ScriptedTeacher()
    cfg = tiny_config(target, other, teacher_data_from=str(run_dir / "iter_2"), max_iterations=1, eval_base=False)
    run(cfg, teacher=teacher)
    refined = read_jsonl(run_dir / "iter_2" / "data.jsonl")
    got = read_jsonl(target / "iter_1" / "data.jsonl")
    assert [r["rationale"] for r in got] == [r["rationale"] for r in refined]
    assert all(r["origin"].startswith("transfer:") for r in got)
    assert [k for k, _ in teacher.requests] == ["rationale"] * 8  # only the validation solutions for diagnosis


@pytest.mark.slow
def test_regenerate_only_what_the_student_gets_wrong(tiny_student, tmp_path):
    from undo_jax.undo.rundir import atomic_write_jsonl

    run_dir = tmp_path / "wrong"
    run(tiny_config(run_dir, tiny_student, regenerate="wrong", eval_base=False, max_iterations=1),
        teacher=ScriptedTeacher())
    # The random student is wrong everywhere; declare its even-numbered training answers right, as if it had
    # learned them, to see that only the others are sent for rewriting.
    rd = RunDir(run_dir)
    rows = [dict(r, correct=number(r["id"]) % 2 == 0) for r in read_jsonl(run_dir / "iter_1" / "data.jsonl")]
    atomic_write_jsonl(run_dir / "iter_1" / "eval_train.jsonl", rows)
    rd.mark_done(1, "eval_train", {"summary": {}})
    teacher = ScriptedTeacher()
    run(tiny_config(run_dir, tiny_student, regenerate="wrong", eval_base=False, max_iterations=2,
                    allow_flag_change=True), teacher=teacher)
    previous = {r["id"]: r for r in read_jsonl(run_dir / "iter_1" / "data.jsonl")}
    rewritten = [p for k, p in teacher.requests if k == "rewrite"]
    assert len(rewritten) == sum(not r["correct"] for r in rows) > 0
    for r in read_jsonl(run_dir / "iter_2" / "data.jsonl"):
        if number(r["id"]) % 2 == 0:
            assert r["origin"] == "previous" and not r["changed"]
        else:  # sent for rewriting: the scripted rewrite is wrong on every 3rd question, so that one keeps its
            # previous rationale, the others take the rewrite
            assert r["teacher_text"].startswith("Revised after gap report")
            if number(r["id"]) % 3 == 0:
                assert r["origin"] == "previous" and not r["teacher_correct"]
                assert r["rationale"] == previous[r["id"]]["rationale"]
            else:
                assert r["origin"] == "rewrite" and r["teacher_correct"] and r["changed"]
                assert r["rationale"] == r["teacher_text"]


def test_tensorboard_scalars_are_read_back(undo_run):
    from undo_jax.undo.tensorboard import read_scalars

    run_dir, _, _ = undo_run
    scalars = read_scalars(run_dir / "tb")
    logs = [read_jsonl(run_dir / f"iter_{k}" / "train_log.jsonl") for k in (1, 2)]
    steps = [[r for r in log if "loss" in r] for log in logs]
    expected = [(r["step"], r["loss"]) for r in steps[0]] + [(len(steps[0]) + r["step"], r["loss"]) for r in steps[1]]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in expected], rtol=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(scalars[tag]) == len(expected)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert scalars["accuracy/validation"] == [(m["iteration"], pytest.approx(m["val_accuracy"])) for m in metrics]
    assert scalars["accuracy/test"] == [(m["iteration"], pytest.approx(m["test_accuracy"])) for m in metrics]
