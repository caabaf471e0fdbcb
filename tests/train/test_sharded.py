"""Sharded training equals single-device training: fsdp 4 x tensor 2 and data 8 on 8 simulated devices."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from undo_jax.sharding import make_mesh
from undo_jax.train import TrainConfig, train_tokenized
from undo_jax.train.data import TokenizedExample

# adam_eps=1e-6: with 1e-8 an element whose gradient is ~1e-8 (a token seen once) turns float summation-order
# noise into a visible update difference (Adam divides by |g|); the gradients themselves agree to ~1e-7.
CONFIG = TrainConfig(lr=3e-3, epochs=1, batch_size=8, micro_batch=8, max_length=32, packing=False,
                     warmup_ratio=0.3, weight_decay=0.01, adam_eps=1e-6, progress=False)


def seqs():
    rng = np.random.default_rng(1)
    return [TokenizedExample(rng.integers(4, 128, size=n).astype(np.int32), int(rng.integers(1, n - 1)))
            for n in rng.integers(5, 33, size=24)]


def run(mesh, tmp_path, name):
    log_path = tmp_path / f"{name}.jsonl"
    model = train_tokenized(tiny_model(seed=2), seqs(), CONFIG, mesh=mesh, log_path=log_path)
    records = [json.loads(line) for line in log_path.read_text().splitlines()[1:]]
    losses = [(r["loss"], r["grad_norm"]) for r in records]
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.state(model).to_pure_dict()))
    params = {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}
    return losses, params, model


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(make_mesh(devices=jax.devices()[:1]), tmp_path_factory.mktemp("single"), "single")


@pytest.mark.parametrize("layout", [dict(data=1, fsdp=4, tensor=2),
                                    pytest.param(dict(data=8, fsdp=1, tensor=1), marks=pytest.mark.slow)])
def test_sharded_training_matches_one_device(single, tmp_path, layout):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    losses, params, model = run(make_mesh(**layout), tmp_path, "sharded")
    expected_losses, expected_params, _ = single
    assert len(losses) == 3  # 24 examples, 8 per step (gradient accumulation: tests/train/test_resume.py)
    # Losses and gradient norms per step.
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    # Per tensor, relative to its norm (Adam's first steps divide by |g|, so a single element whose gradient
    # is ~0 may move by float noise; the tensor as a whole must agree to 1e-5).
    for name, want in expected_params.items():
        rel = np.linalg.norm(params[name] - want) / np.linalg.norm(want)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"
    # The trained model's params live on the mesh as the rules say.
    q = model.layers.self_attn["q_proj"][...]
    assert q.sharding.mesh.shape == make_mesh(**layout).shape
    if layout["tensor"] == 2:
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
