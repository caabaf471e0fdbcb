"""Bounded disk: --keep_train_state keeps the optimizer state of the latest iteration only (params of every
iteration stay loadable), and a disk-full error while a checkpoint is saved is one line that leaves the
previous checkpoint loadable."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tests.undo.scripted_teacher import ScriptedTeacher
from tests.undo.test_loop_e2e import tiny_config
from undo_jax.undo import UndoError, run
from undo_jax.undo.student import load_student


def params(model) -> list[np.ndarray]:
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def checkpoint_kinds(run_dir, iterations):
    return {k: sorted(p.name for p in (run_dir / f"iter_{k}" / "checkpoint").iterdir()) for k in iterations}


def test_keep_last_keeps_one_optimizer_state_after_three_iterations(tmp_path, tiny_student):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, tiny_student, mode="standard", max_iterations=3, eval_base=False, epochs_first=1,
                      train_size=8, test_size=4, val_size=4)
    state = run(cfg, teacher=ScriptedTeacher(cache_path=str(tmp_path / "cache.sqlite")))
    assert state["iterations"] == 3
    kinds = checkpoint_kinds(run_dir, (1, 2, 3))
    assert kinds == {1: ["model.json", "params"], 2: ["model.json", "params"], 3: ["state"]}
    # Every iteration's student still loads; iteration 2 trained on from 1, so their parameters differ.
    p1, p2 = (params(load_student(str(run_dir / f"iter_{k}"))[0]) for k in (1, 2))
    assert any(not np.array_equal(a, b) for a, b in zip(p1, p2, strict=True))


def test_disk_full_while_saving_is_one_line_and_the_previous_checkpoint_loads(tmp_path, tiny_student, monkeypatch):
    from undo_jax.train import checkpoint

    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, tiny_student, max_iterations=1, eval_base=False, epochs_first=2, save_every=1,
                      train_size=16, test_size=4, val_size=4)
    real_save, saves = checkpoint.TrainCheckpointer.save, []

    def save_until_disk_full(self, step, state, meta):
        saves.append(step)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, state, meta)

    monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", save_until_disk_full)
    with pytest.raises(UndoError) as err:
        run(cfg, teacher=ScriptedTeacher(cache_path=str(tmp_path / "cache.sqlite")))
    message = str(err.value)
    assert "\n" not in message and "disk full" in message and "previous checkpoint is intact" in message
    ckpt = checkpoint.TrainCheckpointer(run_dir / "iter_1" / "checkpoint", keep=10)
    try:
        assert ckpt.latest_step() == saves[1]
    finally:
        ckpt.close()
    load_student(str(run_dir / "iter_1"))  # the previous checkpoint restores
    monkeypatch.undo()  # space is back: the re-run resumes from that checkpoint and finishes
    assert run(cfg, teacher=ScriptedTeacher(cache_path=str(tmp_path / "cache.sqlite")))["iterations"] == 1
