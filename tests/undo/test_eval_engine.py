"""--eval_engine=continuous through the loop's evaluation: the same completions as the static engine."""

from __future__ import annotations

from tests.undo.conftest import tiny_config
from undo_jax.undo import run
from undo_jax.undo.rundir import read_jsonl


def test_continuous_engine_evaluates_like_static(tiny_student, tmp_path):
    rows = {}
    for engine in ("static", "continuous"):
        # 16 test questions through 4 slots: finished slots are refilled several times.
        cfg = tiny_config(tmp_path / engine, tiny_student, max_iterations=1, eval_engine=engine, eval_batch_size=4,
                          eval_chunk=16, max_new_tokens=16)
        run(cfg)
        rows[engine] = read_jsonl(tmp_path / engine / "iter_1" / "eval_test.jsonl")
    assert len(rows["static"]) == 16
    assert [r["completion"] for r in rows["continuous"]] == [r["completion"] for r in rows["static"]]
    assert [r["correct"] for r in rows["continuous"]] == [r["correct"] for r in rows["static"]]
