"""`python -m undo_jax.status RUN` on the finished two-iteration run of the loop tests, on a copy whose holder
was killed mid-stage, on one whose holder is alive (lock held) and on one that stopped on an error."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from undo_jax.status import render
from undo_jax.undo.rundir import RunLock

REPO = Path(__file__).resolve().parents[2]
# A holder process: takes the run lock, records the stage it is in, says so, then waits to be killed.
HOLDER = ("import sys, time; from undo_jax.undo.rundir import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
          "lock.note(stage=sys.argv[2]); print('held', flush=True); time.sleep(600)")


def copy_run(undo_run, tmp_path: Path) -> Path:
    dst = tmp_path / "undo"
    shutil.copytree(undo_run[0], dst)
    return dst


def row(text: str, k: int) -> dict[str, str]:
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("iteration  ")).split()[1:]
    cells = next(ln for ln in lines if ln.split() and ln.split()[0] == str(k)).split("  ")
    values = [c.strip() for c in cells[1:] if c.strip()]
    return dict(zip(header, values, strict=True))


def start_holder(run_dir: Path, stage: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), stage], env=dict(os.environ,
                            PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_status_of_a_finished_run_as_a_subprocess(undo_run, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    before = sorted(p.name for p in run_dir.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "undo_jax.status", str(run_dir)], cwd=REPO, text=True,
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    state = json.loads((run_dir / "state.json").read_text())
    assert f"finished: {state['iterations']} iterations" in out
    assert row(out, 0) == {"gaps": "-", "data": "-", "train": "-", "prune_state": "-", "eval_val": "done",
                           "eval_test": "done"}
    assert set(row(out, 2).values()) == {"done"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert f"iteration {m['iteration']}: val {100 * m['val_accuracy']:.1f}%" in out
    log = [json.loads(line) for line in (run_dir / "iter_2" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert f"training: iteration 2: step {steps[-1]['step']}/{log[0]['steps']}, loss {steps[-1]['loss']:.4f}" in out
    calls = sum(e["calls"] for marker in run_dir.glob("iter_*/*.DONE")
                for e in (json.loads(marker.read_text()).get("teacher") or {}).values())
    assert calls > 0 and f"teacher (finished stages): {calls} calls" in out
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # status writes nothing


def test_status_of_a_killed_run(undo_run, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    (run_dir / "iter_2" / "eval_test.DONE").unlink()
    (run_dir / "state.json").unlink()
    holder = start_holder(run_dir, "2:eval_test")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out = render(str(run_dir))
    assert "was killed in stage 2:eval_test" in out and f"pid {holder.pid}" in out
    assert row(out, 2)["eval_test"] == "failed" and row(out, 2)["eval_val"] == "done"


def test_status_of_a_running_run(undo_run, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    (run_dir / "iter_2" / "train.DONE").unlink()
    for name in ("prune_state", "eval_val", "eval_test"):
        (run_dir / "iter_2" / f"{name}.DONE").unlink()
    (run_dir / "state.json").unlink()
    holder = start_holder(run_dir, "2:train")
    try:
        out = render(str(run_dir))
    finally:
        holder.kill()
        holder.wait()
    assert f"running: pid {holder.pid} on host" in out and "stage 2:train" in out
    assert row(out, 2) == {"gaps": "done", "data": "done", "train": "running", "prune_state": "not started",
                           "eval_val": "not started", "eval_test": "not started"}


def test_status_of_a_run_that_stopped_on_an_error(undo_run, tmp_path):
    run_dir = copy_run(undo_run, tmp_path)
    (run_dir / "iter_2" / "gaps.DONE").unlink()
    (run_dir / "state.json").unlink()
    lock = RunLock(run_dir)
    lock.acquire()
    lock.note(stage="2:gaps")
    lock.release(error="iteration 2: degenerate gap report after one retry")
    out = render(str(run_dir))
    assert "on an error in stage 2:gaps: iteration 2: degenerate gap report" in out
    assert row(out, 2)["gaps"] == "failed"


def test_evaluate_from_run_takes_the_runs_data_and_generation_settings(undo_run):
    """`evaluate --from_run=RUN`: the run's task part, student settings and evaluation settings (config.json),
    its best iteration's student; a flag of those parts that changes results is refused in one line."""
    import pytest

    from undo_jax.config import EvalCommand, RunConfig
    from undo_jax.configtree import ConfigError, from_json
    from undo_jax.flags import parse_command

    run_dir = undo_run[0]
    run_cfg = from_json(RunConfig, json.loads((run_dir / "config.json").read_text()))
    best = json.loads((run_dir / "state.json").read_text())["best_iteration"]
    cfg = parse_command(EvalCommand, ["prog", f"--from_run={run_dir}", "--eval_batch_size=3"]).cfg
    assert cfg.task == run_cfg.task and cfg.task.data_source == "demo" and cfg.task.test_size == 16
    assert cfg.eval == dataclasses.replace(run_cfg.eval, batch_size=3)  # bookkeeping flags may differ
    assert cfg.student.source == str(run_dir / f"iter_{best}")
    assert cfg.output.eval_out.endswith(f"undo-iter_{best}-svamp-test.jsonl")
    base = parse_command(EvalCommand, ["prog", f"--from_run={run_dir}", "--iteration=0", "--split=validation"]).cfg
    assert base.student == run_cfg.student and base.output.split == "validation"
    for flag in ("--max_new_tokens=64", "--task=gsm8k", "--student=x", "--val_size=3"):
        with pytest.raises(ConfigError, match=f"^{flag.split('=')[0]}: comes from --from_run="):
            parse_command(EvalCommand, ["prog", f"--from_run={run_dir}", flag])
    with pytest.raises(ConfigError, match="^--iteration: 7: .* has not finished training"):
        parse_command(EvalCommand, ["prog", f"--from_run={run_dir}", "--iteration=7"])


def test_push_to_hub_uploads_final_to_a_loopback_hub(undo_run, tmp_path, monkeypatch):
    """--push_to_hub on a finished run (re-running it resumes past every stage, then pushes final/ and report.md)
    against a local stub of the hub's create/preupload/commit endpoints."""
    import dataclasses

    from huggingface_hub import constants

    from undo_jax.config import RunConfig
    from undo_jax.configtree import from_json
    from undo_jax.testing.hub_stub import HubStub
    from undo_jax.undo import UndoRun

    run_dir = copy_run(undo_run, tmp_path)
    cfg = from_json(RunConfig, json.loads((run_dir / "config.json").read_text()))
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, run_dir=str(run_dir),
                                                              push_to_hub="me/undo-student"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with HubStub("hf_test_token") as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this hub is loopback
        UndoRun(cfg, teacher=undo_run[1]).run()
    files = hub.repos["me/undo-student"]
    final = run_dir / "final"
    assert {p.name for p in final.iterdir() if p.is_file()} | {"report.md"} == set(files)
    assert files["config.json"] == (final / "config.json").read_bytes()
    assert files["report.md"] == (run_dir / "report.md").read_bytes()
    assert hub.private["me/undo-student"]
