"""Logit distillation through the trainer: teacher targets packed with the examples, the KD loss in the sharded step."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from undo_jax.sharding import make_mesh
from undo_jax.train import TrainConfig, train_tokenized
from undo_jax.train import data as data_lib
from undo_jax.train.distill_loss import distill_loss_sum
from undo_jax.train.teacher_logits import TeacherLogitStore, compute_teacher_logits, example_key

CONFIG = TrainConfig(lr=3e-3, epochs=1, batch_size=8, micro_batch=4, max_length=48, packing=True, warmup_ratio=0.3,
                     adam_eps=1e-6, kd_alpha=0.3, kd_temperature=2.0, kd_divergence="jsd", kd_beta=0.5,
                     loss_chunk=16, progress=False)
K = 8


def base_seqs():
    rng = np.random.default_rng(4)
    return [data_lib.TokenizedExample(rng.integers(4, 128, size=n).astype(np.int32), int(rng.integers(1, n - 1)))
            for n in rng.integers(5, 30, size=24)]


@pytest.fixture(scope="module")
def with_teacher(tmp_path_factory):
    seqs = base_seqs()
    store = TeacherLogitStore(tmp_path_factory.mktemp("logits"), "tiny-teacher", K)
    compute_teacher_logits(tiny_model(seed=9), {str(i): s for i, s in enumerate(seqs)}, store, batch_size=8)
    return [dataclasses.replace(s, teacher=store.get(example_key("tiny-teacher", K, s))) for s in seqs]


def _run(seqs, config, mesh, log_path):
    model = train_tokenized(tiny_model(seed=2), seqs, config, mesh=mesh, log_path=log_path)
    records = [json.loads(line) for line in log_path.read_text().splitlines()[1:]]
    params = {jax.tree_util.keystr(p): np.asarray(v)
              for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.state(model).to_pure_dict()))[0]}
    return [r["loss"] for r in records], params


def test_micro_batches_carry_teacher_targets_aligned_with_the_completion(with_teacher):
    batches = data_lib.step_micro_batches(with_teacher[:8], CONFIG)
    rows = 0
    for b in batches:
        arrays = b.arrays()
        assert set(arrays) >= {"top_logp", "top_ids", "log_tail"}
        mask = b.loss_mask > 0
        # Inside the mask: the stored teacher rows, in order; outside: zeros.
        assert np.all(arrays["log_tail"][~mask] == 0) and np.all(arrays["log_tail"][mask] < 0)
        rows += int(mask.sum())
    assert rows == sum(len(s) - s.completion_start for s in with_teacher[:8])
    # The first example's targets land on its completion positions.
    first = with_teacher[0]
    b = data_lib.step_micro_batches([first], CONFIG)[0]
    np.testing.assert_array_equal(b.top_ids[0][b.loss_mask[0] > 0], first.teacher.top_ids)
    with pytest.raises(ValueError, match="some examples carry teacher targets"):
        data_lib.step_micro_batches([first, base_seqs()[1]], CONFIG)


def test_first_step_loss_is_the_distillation_loss(with_teacher, tmp_path):
    losses, _ = _run(with_teacher, CONFIG, make_mesh(devices=jax.devices()[:1]), tmp_path / "log.jsonl")
    # Recompute step 0's loss directly: the step's examples, packed the same way, through distill_loss_sum.
    model = tiny_model(seed=2)
    indices = data_lib.step_example_indices(len(with_teacher), CONFIG, 0)
    total = count = 0.0
    for b in data_lib.step_micro_batches([with_teacher[i] for i in indices], CONFIG):
        arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
        teacher = {k: arrays[k] for k in ("top_logp", "top_ids", "log_tail")}
        loss, parts = distill_loss_sum(model, arrays, teacher, CONFIG.distill_settings())
        total, count = total + float(loss), count + float(parts["count"])
        assert float(parts["kd_sum"]) > 0
    np.testing.assert_allclose(losses[0], total / count, rtol=1e-5)


def test_alpha_one_trains_exactly_like_sft(with_teacher, tmp_path):
    mesh = make_mesh(devices=jax.devices()[:1])
    config = dataclasses.replace(CONFIG, kd_alpha=1.0)
    kd_losses, kd_params = _run(with_teacher, config, mesh, tmp_path / "kd.jsonl")
    sft_losses, sft_params = _run(base_seqs(), config, mesh, tmp_path / "sft.jsonl")
    np.testing.assert_allclose(kd_losses, sft_losses, rtol=1e-6)
    for name, want in sft_params.items():
        np.testing.assert_allclose(kd_params[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_sharded_distillation_equals_one_device(with_teacher, tmp_path):
    assert len(jax.devices()) == 8
    one_losses, one_params = _run(with_teacher, CONFIG, make_mesh(devices=jax.devices()[:1]), tmp_path / "a.jsonl")
    sh_losses, sh_params = _run(with_teacher, CONFIG, make_mesh(data=1, fsdp=4, tensor=2), tmp_path / "b.jsonl")
    np.testing.assert_allclose(sh_losses, one_losses, rtol=1e-5)
    for name, want in one_params.items():
        rel = np.linalg.norm(sh_params[name] - want) / np.linalg.norm(want)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"


def test_teacher_targets_change_the_data_fingerprint(with_teacher):
    assert data_lib.fingerprint(with_teacher) != data_lib.fingerprint(base_seqs())
