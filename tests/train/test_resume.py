"""Orbax checkpoints: a run killed with SIGKILL and restarted ends bit-identical to an uninterrupted run;
params-only snapshots; clear errors for checkpoints of another model or other data."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from undo_jax.sharding import make_mesh
from undo_jax.train import (
    CheckpointMismatchError,
    TrainConfig,
    epoch_params_dir,
    restore_model,
    save_model_checkpoint,
    train_tokenized,
)
from undo_jax.train.data import TokenizedExample

REPO_ROOT = Path(__file__).resolve().parents[2]
# 10 examples, 2 per step: 5 steps per epoch, 10 in all; 2 micro-batches per step (gradient accumulation).
CONFIG = TrainConfig(lr=3e-3, epochs=2, batch_size=2, micro_batch=1, max_length=16, packing=False,
                     warmup_ratio=0.2, weight_decay=0.01, save_epoch_params=True, keep=3, progress=False)


def make_seqs(seed=4, count=10):
    rng = np.random.default_rng(seed)
    return [TokenizedExample(rng.integers(4, 128, size=n).astype(np.int32), int(rng.integers(1, n - 1)))
            for n in rng.integers(6, 17, size=count)]  # one length bucket


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def flat_params(model):
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.state(model, nnx.Param).to_pure_dict()))
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in flat}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# Trains in a fresh process and SIGKILLs itself at the end of epoch 2 (step 10, before the final
# checkpoint), once the step-5 checkpoint is on disk: the restart must resume from step 5.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from tests.train.test_resume import CONFIG, make_seqs, one_device
    from {factory_module} import {factory}
    from undo_jax.train import train_tokenized

    def die(epoch, model):
        if epoch == 2:
            while not os.path.isdir(os.path.join({ckpt!r}, "state", "5")):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    train_tokenized({factory}(seed=9), make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir={ckpt!r},
                    log_path={log!r}, epoch_end_callback=die)
    raise SystemExit("not killed")
""")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: (final params, checkpoint dir, log path)."""
    root = tmp_path_factory.mktemp("straight")
    model = train_tokenized(tiny_model(seed=9), make_seqs(), CONFIG, mesh=one_device(),
                            checkpoint_dir=root / "ckpt", log_path=root / "log.jsonl")
    return flat_params(model), root / "ckpt", root / "log.jsonl"


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_bit_identical(straight, tmp_path):
    """In-process variant (cheap: reuses the compiled steps): an exception at step 10, before the final save."""
    expected, _, _ = straight
    ckpt = tmp_path / "ckpt"

    def interrupt(epoch, model):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_tokenized(tiny_model(seed=9), make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir=ckpt,
                        epoch_end_callback=interrupt)
    assert sorted(os.listdir(ckpt / "state")) == ["5"]
    model = train_tokenized(tiny_model(seed=1), make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir=ckpt)
    assert_bit_identical(flat_params(model), expected)


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(straight, tmp_path):
    expected, straight_ckpt, straight_log = straight
    ckpt, log_path = tmp_path / "ckpt", tmp_path / "log.jsonl"
    script = KILLED_RUN.format(root=str(REPO_ROOT), ckpt=str(ckpt), log=str(log_path),
                               factory_module="tests.train.helpers", factory="tiny_model")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(os.listdir(ckpt / "state")) == ["5"]  # killed before the final checkpoint
    killed_steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert killed_steps == list(range(11))  # it had logged all 10 steps

    model = train_tokenized(tiny_model(seed=123), make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir=ckpt,
                            log_path=log_path)
    assert_bit_identical(flat_params(model), expected)
    # Steps 6..10 were logged again after the resume point, not duplicated; same values as the straight run.
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    straight_records = [json.loads(line) for line in straight_log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(11))
    assert [r.get("loss") for r in records] == [r.get("loss") for r in straight_records]
    # Epoch snapshots (one written before the kill, one after) equal the straight run's.
    for epoch in (1, 2):
        a = restore_model(tiny_model(seed=0), epoch_params_dir(ckpt, epoch))
        b = restore_model(tiny_model(seed=0), epoch_params_dir(straight_ckpt, epoch))
        assert_bit_identical(flat_params(a), flat_params(b))


def test_finished_run_is_not_trained_again(straight):
    expected, ckpt, _ = straight
    model = train_tokenized(tiny_model(seed=77), make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir=ckpt)
    assert_bit_identical(flat_params(model), expected)
    assert sorted(os.listdir(ckpt / "state")) == ["10", "5"]


def test_restore_model_reads_a_training_checkpoint_dir(straight):
    expected, ckpt, _ = straight
    assert_bit_identical(flat_params(restore_model(tiny_model(seed=5), ckpt)), expected)


def test_save_and_restore_params_only(tmp_path):
    source = tiny_model(seed=1)
    save_model_checkpoint(source, tmp_path / "student")
    assert_bit_identical(flat_params(restore_model(tiny_model(seed=2), tmp_path / "student")), flat_params(source))
    with pytest.raises(FileExistsError, match="already exists"):
        save_model_checkpoint(source, tmp_path / "student")
    # Restoring straight onto a mesh: the template's shardings are kept.
    mesh = make_mesh(fsdp=-1)
    from undo_jax.sharding import shard_model

    target = shard_model(tiny_model(seed=3), mesh)
    restore_model(target, tmp_path / "student")
    assert target.layers.mlp["up_proj"][...].sharding.mesh.shape == mesh.shape
    assert_bit_identical(flat_params(target), flat_params(source))


def test_checkpoint_of_another_model_is_a_clear_error(straight, tmp_path):
    _, ckpt, _ = straight
    bigger = tiny_model(seed=0, intermediate_size=96)
    # Stacked layers: shapes carry the leading layer axis (2 layers).
    mismatch = r"another model's parameters: .*mlp.*\(2, 64, 32\).*\(2, 96, 32\)"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        train_tokenized(bigger, make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir=ckpt)
    with pytest.raises(CheckpointMismatchError, match="another model's parameters"):
        restore_model(tiny_model(seed=0, intermediate_size=96), ckpt)
    save_model_checkpoint(tiny_model(seed=0), tmp_path / "small")
    with pytest.raises(CheckpointMismatchError, match="another model's parameters"):
        restore_model(bigger, tmp_path / "small")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        restore_model(bigger, tmp_path / "nothing")


def test_checkpoint_of_other_data_or_settings_is_a_clear_error(straight):
    _, ckpt, _ = straight
    with pytest.raises(CheckpointMismatchError, match="other training data"):
        train_tokenized(tiny_model(seed=9), make_seqs(seed=5), CONFIG, mesh=one_device(), checkpoint_dir=ckpt)
    import dataclasses

    with pytest.raises(CheckpointMismatchError, match=r"other training settings \(lr\)"):
        train_tokenized(tiny_model(seed=9), make_seqs(), dataclasses.replace(CONFIG, lr=1.0), mesh=one_device(),
                        checkpoint_dir=ckpt)
