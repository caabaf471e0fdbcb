"""The real learning result on CPU: SmolLM2-135M-Instruct on SVAMP (../shared/data/svamp, 700 train pool /
300 test), the reference teacher, standard distillation then UNDO; reports the base accuracy, the test accuracy
after iterations 1 and 2, and the wall time per stage.

    python bench/svamp_learning.py                    # both modes, defaults sized for ~60 min of 2 CPU cores
    python bench/svamp_learning.py --quick            # a short version to measure step and answer times
    python bench/svamp_learning.py --modes=undo       # one mode only
    python bench/svamp_learning.py --modes=undo --student=gemma3-270m-gguf   # Gemma 3 270M as the student

Each mode is `python -m undo_jax.main` on its own run directory under --out (re-running resumes). With the
reference teacher, regeneration returns the same gold rationales (it cannot read a gap report), so UNDO's
later iterations train on the same data as standard distillation: the two curves should coincide, and
the point of this benchmark is the learning itself (base -> iteration 1 -> iteration 2) and its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "svamp"

# Sized for 2 CPU cores: 200 training questions, 2 + 1 epochs. A trained answer is ~30 tokens ("Let's compute
# step by step. / 76 - 25 = 51. / The answer is 51.") and generation stops when a batch has finished, so the
# 128-token limit costs time mainly in the base evaluation, where the verbose base model needs the room.
COMMON = [
    "--task=svamp", "--teacher=reference", "--val_size=100", "--train_size=200",
    "--epochs_first=2", "--epochs_later=1", "--lr=5e-5", "--warmup_ratio=0.1", "--batch_size=8", "--micro_batch=8",
    "--max_length=256", "--max_new_tokens=128", "--eval_batch_size=50", "--eval_chunk=50", "--max_iterations=2",
    "--diagnosis_examples=20",
]
QUICK = ["--val_size=16", "--train_size=32", "--test_size=32", "--epochs_first=1", "--eval_chunk=16",
         "--eval_batch_size=16"]


def run_mode(mode: str, out: Path, data: Path, student: str, extra: list[str], baseline: Path | None) -> dict:
    run_dir = out / f"svamp-{mode}"
    cmd = [sys.executable, "-m", "undo_jax.main", *COMMON, f"--student={student}", f"--data_source={data}",
           f"--mode={mode}",
           f"--run_dir={run_dir}", *extra]
    if baseline is not None:
        cmd.append(f"--baseline_run={baseline}")
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return {"run_dir": str(run_dir), "wall_s": round(time.time() - start, 1), "command": " ".join(cmd[1:])}


def summarize(run_dir: Path) -> dict:
    from undo_jax.undo.report import stage_times
    from undo_jax.undo.rundir import RunDir, read_jsonl

    rd = RunDir(run_dir)
    metrics = {m["iteration"]: m for m in read_jsonl(rd.metrics_path)}
    return {
        "test_accuracy": {k: round(100 * m["test_accuracy"], 1) for k, m in metrics.items()},
        "val_accuracy": {k: round(100 * m["val_accuracy"], 1) for k, m in metrics.items()},
        "stage_seconds": stage_times(rd),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "bench"))
    p.add_argument("--data", default=os.environ.get("UNDO_SVAMP_DATA", str(DEFAULT_DATA)))
    p.add_argument("--modes", default="standard,undo")
    p.add_argument("--student", default="smollm2-gguf",
                   help="the student (a symbolic name, hub id or path), e.g. gemma3-270m-gguf")
    p.add_argument("--quick", action="store_true", help="a few questions only: measures per-step/per-answer cost")
    a, passthrough = p.parse_known_args()
    data = Path(a.data)
    if not data.exists():
        sys.exit(f"svamp_learning: no SVAMP data at {data} (pass --data or set UNDO_SVAMP_DATA)")
    out = Path(a.out) / ("quick" if a.quick else "full")
    if a.student != "smollm2-gguf":  # keep the SmolLM2 runs where earlier notes point
        out = out / a.student.replace("/", "_")
    extra = (QUICK if a.quick else []) + passthrough
    results, baseline = {}, None
    for mode in a.modes.split(","):
        # The base student is the same in both runs: evaluate it once (in the first run).
        mode_extra = extra + (["--noeval_base"] if results else [])
        results[mode] = run_mode(mode, out, data, a.student, mode_extra, baseline if mode == "undo" else None)
        results[mode].update(summarize(Path(results[mode]["run_dir"])))
        if mode == "standard":
            baseline = Path(results[mode]["run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"student": a.student, **results}, indent=2))
    base = next(iter(results.values()))["test_accuracy"].get(0)
    for mode, r in results.items():  # one JSON object per line; the readable copy is summary.json in --out
        acc = r["test_accuracy"]
        print(json.dumps({"student": a.student, "mode": mode, "test_accuracy_base": base,
                          "test_accuracy_iteration_1": acc.get(1), "test_accuracy_iteration_2": acc.get(2),
                          "wall_s": r["wall_s"], "summary": str(out / "summary.json")}), flush=True)


if __name__ == "__main__":
    main()
