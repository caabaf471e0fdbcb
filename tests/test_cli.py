"""The command line a newcomer meets, driven as subprocesses: --help on every entry point, and bad input that
stops with exactly one line on stderr naming the flag or path, before anything is written and before JAX is
imported (these need no model, so each subprocess is quick; their wall times are printed, not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from undo_jax.config import EvalCommand, RunConfig, run_config
from undo_jax.configtree import flag_leaves

REPO = Path(__file__).resolve().parents[1]
PROGS = {"main": "undo_jax.main", "evaluate": "undo_jax.evaluate", "report": "undo_jax.undo.report",
         "status": "undo_jax.status"}


def run(prog: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", PROGS[prog], *args], cwd=REPO, env=full_env, text=True,
                          capture_output=True, timeout=120)
    proc.wall_s = time.perf_counter() - start
    return proc


def snapshot(path: Path) -> dict[str, tuple[int, float]] | None:
    """Every file under `path` with its size and mtime (None: absent) - "unchanged" means equal snapshots."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime) for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("prog, cls, flag", [("main", RunConfig, "--help"), ("main", RunConfig, "-h"),
                                             ("main", RunConfig, "--helpfull"), ("evaluate", EvalCommand, "--help")])
def test_help_lists_every_group_with_defaults(prog, cls, flag):
    proc = run(prog, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    for leaf in flag_leaves(cls):
        assert f"\n{leaf.section}:\n" in out
        assert f"  --{leaf.flag}  (" in out
    assert "default: 1e-05" in out if cls is RunConfig else "default: test" in out
    if cls is RunConfig:
        assert "--dry_run" in out and "--status" in out


@pytest.mark.parametrize("prog", ["report", "status"])
def test_help_of_the_run_dir_commands(prog, tmp_path):
    proc = run(prog, "--help")
    assert proc.returncode == 0 and "usage: python -m" in proc.stdout and proc.stderr == ""
    bad = run(prog, str(tmp_path / "nothing"))  # a folder that is not a run: one line, nothing created
    assert bad.returncode != 0 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert str(tmp_path / "nothing") in bad.stderr
    assert not (tmp_path / "nothing").exists()


def fake_student(folder: Path) -> Path:
    """A folder that passes the cheap student check (config and tokenizer files present)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def held_run_dir(tmp_path: Path) -> Path:
    from undo_jax.undo.rundir import RunDir

    run_dir = tmp_path / "held"
    RunDir(run_dir).prepare(["--x"], {}, allow_change=False)
    return run_dir


def finished_run_dir(tmp_path: Path, student: Path) -> Path:
    """A run directory with one finished stage, made with --lr=1e-5."""
    from undo_jax.undo.rundir import RunDir

    run_dir = tmp_path / "finished"
    cfg = run_config(run_dir=str(run_dir), student=str(student), data_source="demo")
    rd = RunDir(run_dir)
    rd.prepare(["--x"], cfg.identity(), allow_change=False)
    rd.mark_done(0, "eval_val", {"summary": {"accuracy": 0.5, "n": 2, "correct": 1}})
    return run_dir


def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(tmp_path):
    from undo_jax.undo.rundir import RunLock

    student = fake_student(tmp_path / "student")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    no_student = tmp_path / "empty_dir"
    no_student.mkdir()
    held = held_run_dir(tmp_path)
    finished = finished_run_dir(tmp_path, student)
    ok = [f"--student={student}", "--data_source=demo"]
    cases = [  # (prog, args, needle in the error line, the run dir the case must leave as it was, env)
        ("main", ["lr=abc"], "'lr=abc': positional arguments", None, {}),
        ("main", ["--split=test"], "--split: not a flag of undo_jax.main (it is one of undo_jax.evaluate's)", None, {}),
        ("main", ["--eval_out=x.jsonl"], "--eval_out: not a flag of undo_jax.main", None, {}),
        ("evaluate", ["--lr=1"], "--lr: not a flag of undo_jax.evaluate (it is one of undo_jax.main's)", None, {}),
        ("evaluate", ["--teacher=gemini"], "--teacher: not a flag of undo_jax.evaluate", None, {}),
        ("evaluate", [f"--student={student}", "extra"], "'extra': positional", None, {}),
        ("main", [f"--data_source={tmp_path / 'nope'}"], f"--data_source={tmp_path / 'nope'}: no such file", "run", {}),
        ("main", [f"--student={tmp_path / 'none'}"], f"--student={tmp_path / 'none'}: no such file", "run", {}),
        ("main", [f"--student={no_student}"], "no config.json in this folder", "run", {}),
        ("main", ["--teacher=gemini"], "GEMINI_API_KEY", "run", {"GEMINI_API_KEY": "", "GOOGLE_API_KEY": ""}),
        ("main", ["--teacher_batch_api"], "--teacher_batch_api: applies to --teacher=gemini only", "run", {}),
        ("main", ["--teacher=local"], "--teacher_model: is required with --teacher=local", "run", {}),
        ("main", ["--push_to_hub=org/name"], "--push_to_hub=org/name: no hub token", "run",
         {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}),
        ("main", [f"--run_dir={blocker / 'run'}"], f"{blocker} is a file, not a directory", None, {}),
        ("main", [f"--run_dir={held}"], "in use by another run", "held", {}),
        ("main", [f"--run_dir={finished}", "--lr=0.5"], "was run with --lr=1e-05, now --lr=0.5", "finished", {}),
        ("evaluate", [f"--student={student}", f"--eval_out={blocker / 'x.jsonl'}"], "is a file, not a directory",
         None, {}),
        ("evaluate", ["--from_run=" + str(tmp_path)], "--from_run: " + str(tmp_path) + ": no config.json", None, {}),
    ]
    lock = RunLock(held)
    lock.acquire()
    walls = []
    try:
        for prog, args, needle, keep, env in cases:
            run_dir = tmp_path / (keep or "run")
            base = [f"--run_dir={tmp_path / 'run'}", *ok] if prog == "main" else []
            argv = [*base, *args] if prog == "main" else args
            before = snapshot(run_dir)
            proc = run(prog, *argv, env=env)
            walls.append((prog, args[0], round(proc.wall_s, 2)))
            lines = proc.stderr.splitlines()
            assert proc.returncode != 0, (args, proc.stdout[-500:])
            assert len(lines) == 1, (args, proc.stderr)
            assert lines[0].startswith(f"{PROGS[prog]}: error: ") and needle in lines[0], (args, lines[0])
            assert snapshot(run_dir) == before, args  # absent stays absent, existing stays unchanged
    finally:
        lock.release()
    print(json.dumps({"bad_input_wall_s": walls}))


def test_a_run_dir_without_a_finished_stage_counts_as_new(tmp_path):
    """What a failed first attempt left (flags.txt, identity.json of --data_source=/nonexistent) does not block
    the corrected command."""
    from undo_jax.preflight import check_run_dir
    from undo_jax.undo.rundir import RunDir

    student = fake_student(tmp_path / "student")
    run_dir = tmp_path / "run"
    wrong = run_config(run_dir=str(run_dir), student=str(student), data_source="/nonexistent")
    RunDir(run_dir).prepare(["--x"], wrong.identity(), allow_change=False)
    right = run_config(run_dir=str(run_dir), student=str(student), data_source="demo")
    check_run_dir(right)  # no error
    assert RunDir(run_dir).prepare(["--y"], right.identity(), allow_change=False)
    assert json.loads((run_dir / "identity.json").read_text())["data_source"] == "demo"
