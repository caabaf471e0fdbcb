"""Issue 15's mutation check: per mutation, apply it to the package, run the NEW test and the OLD one
(`git show main:<test file>`, copied beside it as old_<name>.py), then revert; prints one JSON line each.

    python tools/mutation_check.py [M1 M2 ...]     # all when none is named; run from a clean checkout

Each mutation is a plausible bug that the old test let through. Package files are restored in `finally`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

WT = Path(__file__).resolve().parents[1]
MUTATIONS = [
    ("M7", "undo_jax/undo/loop.py", "    if correct:\n        rationale, origin = text, \"rewrite\"",
     "    if text:\n        rationale, origin = text, \"rewrite\"",
     "tests/undo/test_loop_e2e.py", "test_regenerate_only_what_the_student_gets_wrong"),
    ("M1", "undo_jax/sharding.py", '    "embed": "fsdp",', '    "embed": None,',
     "tests/test_sharding.py", "test_sharded_model_matches_unsharded"),
    ("M2", "undo_jax/train/data.py", "np.random.default_rng([config.seed, epoch])",
     "np.random.default_rng([config.seed, epoch, config.epochs])",
     "tests/train/test_data.py", "test_step_schedule_covers_each_epoch_once_and_depends_only_on_the_step"),
    ("M3", "undo_jax/undo/student.py", 'correct = sum(bool(r["correct"]) for r in rows)',
     'correct = sum(bool(r["correct"]) for r in rows[1:])',
     "tests/test_evaluate.py", {"new": "test_evaluate_scores_known_completions",
                                "old": "test_evaluate_matches_generate_and_task_score"}),
    ("M4", "undo_jax/sampling/vote.py", "winner = max(counts, key=lambda a: (counts[a], -first_index[a]))",
     "winner = min(first_index, key=first_index.get)",
     "tests/test_evaluate.py", "test_maj_k_votes_over_samples"),
    ("M5", "undo_jax/train/step.py", "(flat_h, flat_y, flat_m))", "(flat_h[:-1], flat_y[:-1], flat_m[:-1]))",
     "tests/train/test_train_api.py",
     {"new": "test_remat_chunked_loss_and_bf16_compute_agree_with_the_plain_fp32_step",
      "old": "test_bf16_compute_keeps_float32_params"}),
    ("M6", "undo_jax/models/gguf_io.py", 'GGUF rope_freqs (Llama 3.1+ rope scaling) is not supported; "',
     'unsupported GGUF tensor layout; "',
     "tests/models/test_gguf.py", {"new": "test_llama3_rope_scaling_in_gguf_is_refused",
                                   "old": "test_llama3_rope_scaling_in_gguf_is_applied_or_refused"}),
]
only = sys.argv[1:]
env = dict(os.environ, PYTHONPATH=str(WT))
results = []
for mid, pkg, before, after, test_file, names in MUTATIONS:
    if only and mid not in only:
        continue
    names = names if isinstance(names, dict) else {"new": names, "old": names}
    path = WT / pkg
    src = path.read_text()
    assert src.count(before) == 1, (mid, before)
    old_file = WT / Path(test_file).with_name("old_" + Path(test_file).name)
    old_file.write_text(subprocess.run(["git", "show", f"main:{test_file}"], cwd=WT, capture_output=True, text=True,
                                       check=True).stdout)
    path.write_text(src.replace(before, after))
    try:
        out = {}
        for which, f in (("new", test_file), ("old", str(old_file.relative_to(WT)))):
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                   f"{f}::{names[which]}"], cwd=WT, env=env, capture_output=True, text=True)
            last = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
            out[which] = ("PASS" if proc.returncode == 0 else "FAIL", last[-1] if last else proc.stdout[-300:])
    finally:
        path.write_text(src)
        old_file.unlink()
    results.append({"id": mid, "file": pkg, "mutation": f"{before!r} -> {after!r}",
                    "new_test": f"{test_file}::{names['new']}", "new": out["new"], "old": out["old"]})
    print(json.dumps(results[-1]), flush=True)
subprocess.run(["git", "status", "--short"], cwd=WT)
