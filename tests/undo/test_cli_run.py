"""`main --flagfile=configs/gsm8k.cfg` as a subprocess (local GSM8K copy, the tiny student's tokenizer): a check
that needs JAX (the mesh against the devices) stops with one line and writes nothing; the corrected command,
as `--dry_run`, passes every check and prints call and cost bounds that are recomputed here from the split
sizes, and writes nothing either. (Full runs from the command line: tests/undo/test_run_lock.py, the demo
smoke run of CI; `status` on a finished, a killed and a running run: tests/undo/test_status.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(module: str, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEMINI_API_KEY": "", "GOOGLE_API_KEY": "", **env_vars}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=600)


def count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.mark.slow
def test_gsm8k_config_bad_mesh_then_dry_run_bounds_calls_and_cost(tmp_path, tiny_student, shared_data):
    data = shared_data / "gsm8k"
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"{data}: no local GSM8K copy")
    run_dir = tmp_path / "gsm8k-undo"
    args = ["--flagfile=configs/gsm8k.cfg", f"--data_source={data}", f"--run_dir={run_dir}",
            f"--student={tiny_student}"]
    # A key (never used: nothing reaches the teacher) so that the cheap checks pass; 8 devices: 3 does not divide them.
    bad = run("undo_jax.main", *args, "--mesh_data=3", GEMINI_API_KEY="unused")
    assert bad.returncode == 1
    assert len(bad.stderr.splitlines()) == 1, bad.stderr  # no log line or library warning before it
    assert bad.stderr.startswith("undo_jax.main: error: --mesh_data=3 ") and "8 cpu device(s)" in bad.stderr
    assert not run_dir.exists()

    proc = run("undo_jax.main", *args, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not run_dir.exists()  # a dry run writes nothing
    plan = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"dry_run"')))["dry_run"]
    assert "--teacher_model=gemini-2.5-flash" in proc.stdout  # the resolved config is printed

    n_val = 200  # configs/gsm8k.cfg: --val_size=200, carved from the train file
    n_train, n_test = count_rows(data / "train.jsonl") - n_val, count_rows(data / "test.jsonl")
    assert plan["splits"] == {"train": n_train, "validation": n_val, "test": n_test}
    iterations, max_out, p_in, p_out = 4, 2048, 0.30, 2.50  # the config's --max_iterations, token limit, prices
    # Iteration 1: a rationale per training and validation question; later: one gap report + a rewrite each.
    requests = (n_train + n_val) + (iterations - 1) * (1 + n_train)
    t = plan["teacher"]
    assert t["requests"] == requests
    assert t["max_calls"] == 2 * requests  # each answer may be asked once more when unusable
    assert t["max_output_tokens"] == 2 * requests * max_out
    assert t["max_input_tokens"] > 0
    assert t["max_cost_usd"] == pytest.approx((t["max_input_tokens"] * p_in + t["max_output_tokens"] * p_out) / 1e6)
    assert t["max_cost_usd"] >= 2 * requests * max_out * p_out / 1e6
    assert len(plan["stages"]) == 2 + 5 + 3 * 6  # base evals; iteration 1; gaps + 5 per later iteration
    assert plan["student"]["params"] > 0 and plan["student"]["disk"]["params_snapshot_bytes"] > 0
    assert "no API key" in proc.stdout  # what the run itself would stop on is said, not raised
