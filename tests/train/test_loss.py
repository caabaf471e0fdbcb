"""Completion-only loss: matches a per-example reference and does not depend on padding, packing or chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from undo_jax.train import TrainConfig
from undo_jax.train.data import TokenizedExample, step_micro_batches
from undo_jax.train.step import completion_loss_sum, token_nll_sum


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(0)
    out = []
    for n in (23, 9, 31, 14, 5, 18):
        out.append(TokenizedExample(rng.integers(4, 128, size=n).astype(np.int32), int(rng.integers(1, n - 1))))
    return out


def reference_loss(model, seqs):
    """Mean NLL of completion tokens from one right-padded batch through the model's attention_mask path."""
    length = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s.ids
        mask[i, : len(s)] = 1
    logits = jax.jit(lambda i, m: model(i, attention_mask=m))(ids, mask)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    total, count = 0.0, 0
    for i, s in enumerate(seqs):
        for t in range(s.completion_start - 1, len(s) - 1):
            total -= logp[i, t, s.ids[t + 1]]
            count += 1
    return total / count


def batched_loss(model, seqs, config, chunk=0):
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, b: completion_loss_sum(nnx.merge(graphdef, p), b, chunk=chunk))
    total, count = 0.0, 0.0
    for b in step_micro_batches(seqs, config):
        s, c = fn(params, {k: jnp.asarray(v) for k, v in b.arrays().items()})
        total += float(s)
        count += float(c)
    return total / count


@pytest.mark.parametrize("packing,max_length,micro_batch", [(True, 64, 4), (True, 40, 1), (False, 32, 2)])
def test_loss_is_independent_of_padding_and_packing(model, seqs, packing, max_length, micro_batch):
    expected = reference_loss(model, seqs)
    got = batched_loss(model, seqs, TrainConfig(packing=packing, max_length=max_length, micro_batch=micro_batch))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_chunked_loss_equals_unchunked_in_value_and_gradient(model, seqs):
    config = TrainConfig(packing=True, max_length=64, micro_batch=4)
    (batch,) = step_micro_batches(seqs, config)
    batch = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
    graphdef, params = nnx.split(model)

    def loss(p, chunk):
        s, c = completion_loss_sum(nnx.merge(graphdef, p), batch, chunk=chunk)
        return s / c

    full, g_full = jax.jit(jax.value_and_grad(lambda p: loss(p, 0)))(params)
    chunked, g_chunked = jax.jit(jax.value_and_grad(lambda p: loss(p, 48)))(params)  # 48 does not divide 2*64
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunked), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_token_nll_uses_integer_targets():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    targets = jnp.array([[0, 2]])
    mask = jnp.array([[1.0, 0.0]])
    expected = -jax.nn.log_softmax(logits[0, 0])[0]
    np.testing.assert_allclose(float(token_nll_sum(logits, targets, mask)), float(expected), rtol=1e-6)
