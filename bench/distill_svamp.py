"""The white-box distillation experiment on real SVAMP: rationale SFT vs SFT + logit KD vs on-policy (GKD).

    python bench/distill_svamp.py --out=/tmp/distill_svamp            # ~1 h of 2 CPU cores
    python bench/distill_svamp.py --quick --out=/tmp/distill_svamp    # a few questions: the machinery only

Teacher: the student that the SVAMP benchmark's first iteration exports (base SmolLM2-135M-Instruct, 2 epochs
of rationale SFT on the benchmark's 200 training questions; `bench/svamp_learning.py`'s settings, standard
mode, one iteration). Students: base SmolLM2-135M-Instruct, the same 200 questions and rationales, one epoch
each (equal epochs across the three), then greedy test accuracy on the 300 test problems:

  - `rationales`: SFT on the teacher's (here: the reference) rationales, the paper's distillation;
  - `logits`: SFT + forward KL to the logit teacher's top-k distributions over the same rationale tokens;
  - `on_policy`: as `logits`, but half of the steps train on the student's own samples scored by the teacher.

Every run is `python -m undo_jax.main` on its own run directory under --out (re-running resumes); the base
student's accuracy is the SVAMP benchmark's (not re-measured here). One JSON line per run, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svamp_learning import COMMON, DEFAULT_DATA, QUICK, REPO, summarize  # noqa: E402

STUDENT = "--student=smollm2-gguf"
ONE_ITERATION = ["--mode=standard", "--max_iterations=1", "--noeval_base"]
VARIANTS = {
    "rationales": ["--distill=rationales"],
    "logits": ["--distill=logits"],
    # Samples as long as the evaluation's answers; GKD's lambda 0.5 (the default) is kept explicit.
    "on_policy": ["--distill=on_policy", "--on_policy_fraction=0.5", "--on_policy_max_new_tokens=128"],
}


def run(name: str, run_dir: Path, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "undo_jax.main", *COMMON, STUDENT, *ONE_ITERATION, f"--run_dir={run_dir}", *flags]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    row = {"run": name, "wall_s": round(time.time() - start, 1), **summarize(run_dir)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "distill_svamp"))
    p.add_argument("--data", default=os.environ.get("UNDO_SVAMP_DATA", str(DEFAULT_DATA)))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="a few questions only: checks the machinery end to end")
    a = p.parse_args()
    data = Path(a.data)
    if not data.exists():
        sys.exit(f"distill_svamp: no SVAMP data at {data} (pass --data or set UNDO_SVAMP_DATA)")
    unknown = sorted(set(a.variants.split(",")) - set(VARIANTS))
    if unknown:
        sys.exit(f"distill_svamp: --variants: unknown {unknown} (known: {sorted(VARIANTS)})")
    out = Path(a.out) / ("quick" if a.quick else "full")
    common = [f"--data_source={data}", *(QUICK if a.quick else [])]
    rows = [run("teacher", out / "teacher", [*common, "--epochs_first=1" if a.quick else "--epochs_first=2"])]
    teacher = out / "teacher" / "final"
    for name in a.variants.split(","):
        logit_teacher = [] if name == "rationales" else [f"--logit_teacher={teacher}"]
        rows.append(run(name, out / name, [*common, "--epochs_first=1", *logit_teacher, *VARIANTS[name]]))
    summary = {r["run"]: {"test_accuracy": r["test_accuracy"].get(1), "val_accuracy": r["val_accuracy"].get(1),
                          "wall_s": r["wall_s"], "stage_seconds": r["stage_seconds"].get(1)} for r in rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
