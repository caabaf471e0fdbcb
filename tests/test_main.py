"""`python -m undo_jax.main`: flags are validated before any work, and bad input stops the run with one line
(exit 2 for flags, 1 for everything else) while the run directory stays usable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from undo_jax.config import run_config
from undo_jax.main import parse

REPO = Path(__file__).resolve().parents[1]


def run_main(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "undo_jax.main", *args], cwd=REPO, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("undo_jax.main: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--run_dir=x", "--student=s", "--no_such_flag=1"], "no_such_flag"),
    (["--run_dir=x", "--student=s", "--mode=fast"], "mode"),
    (["--run_dir=x", "--student=s", "--batch_size=12", "--micro_batch=8"], "--micro_batch: 8 does not divide"),
    (["--student=s"], "--run_dir: is required"),
    (["--run_dir=x", "--student=s", "--task=gsm8k", "--data_source=demo"], "--data_source: 'demo'"),
    (["--run_dir=x", "--student=s", "--teacher=openai"], "--teacher_model: is required"),
    (["--run_dir=x", "--student=s", "--maj_k=4", "--eval_temperature=0"], "--eval_temperature"),
    (["--flagfile=/nonexistent/undo.cfg"], "nonexistent"),
])
def test_bad_flags_stop_with_one_line(tmp_path, args, needle):
    proc = run_main(*[a.replace("--run_dir=x", f"--run_dir={tmp_path / 'run'}") for a in args])
    assert proc.returncode == 2
    assert needle in error_line(proc)
    assert not (tmp_path / "run").exists()  # nothing was created


def test_flags_round_trip_through_flags_txt():
    from undo_jax.configtree import to_flag_lines
    from undo_jax.main import parse

    cfg = run_config(run_dir="r", student="s", data_source="demo", lr=3e-4, eval_base=False)
    assert parse(["prog", *to_flag_lines(cfg)]) == cfg


# Bad data source, student, teacher key and run directory: tests/test_cli.py (one batch of subprocesses).


def test_different_flags_on_an_existing_run_are_refused(tmp_path):
    from undo_jax.undo.rundir import RunDir

    run_dir = tmp_path / "run"
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    (student / "tokenizer.json").write_text("not a tokenizer")
    args = [f"--run_dir={run_dir}", f"--student={student}", "--data_source=demo", "--val_size=20"]
    rd = RunDir(run_dir)
    rd.prepare(["--x"], parse(["prog", *args]).identity(), allow_change=False)
    rd.mark_done(0, "eval_val", {})  # a finished stage: the directory holds a run of these flags
    second = run_main(*args, "--lr=0.5")
    assert second.returncode == 1
    assert "--lr" in error_line(second) and "--allow_flag_change" in error_line(second)
    third = run_main(*args, "--lr=0.5", "--allow_flag_change")
    assert third.returncode == 1
    assert "--lr" not in error_line(third) and "tokenizer" in error_line(third)  # accepted; fails on the student


@pytest.mark.parametrize("alias", ["smollm2-gguf", "@smollm2"])
def test_symbolic_student_resolves_to_the_wheel_gguf(alias, smollm2_gguf):
    from undo_jax.config import resolve_student

    assert resolve_student(alias) == smollm2_gguf
    assert resolve_student("some/dir") == "some/dir"


def test_gemma3_student_alias_resolves_to_the_assembled_gguf():
    from undo_jax.assets import gemma3_270m_gguf_path
    from undo_jax.config import resolve_student

    try:
        path = gemma3_270m_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert resolve_student("gemma3-270m-gguf") == resolve_student("@gemma3-270m") == path
    assert path.endswith("gemma-3-270m-q4_k_m.gguf")


def test_config_files_parse_and_validate():
    from undo_jax.main import parse

    for path in sorted((REPO / "configs").glob("*.cfg")):
        cfg = parse(["prog", f"--flagfile={path}"])
        assert cfg.task.name in path.stem or path.stem.startswith("demo")  # the demos are SVAMP-style
        assert cfg.run_dir.startswith("runs/")
