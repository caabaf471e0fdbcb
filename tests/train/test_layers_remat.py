"""Scanned vs unrolled layers and per-layer remat policies: same values, less memory with remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from undo_jax.models.decoder import REMAT_POLICIES
from undo_jax.train.step import completion_loss_sum


def _batch(vocab, rows=2, length=48, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(rows, length)).astype(np.int32)
    seg = np.ones((rows, length), np.int32)
    seg[:, length // 2:] = 2
    seg[0, -5:] = 0
    pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)]).astype(np.int32)
    return {"tokens": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, axis=1)),
            "loss_mask": jnp.asarray(seg > 0), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(np.tile(pos, (rows, 1)))}


def _grad_fn(model, remat):
    graphdef, state = nnx.split(model)

    def loss(s, batch):
        total, count = completion_loss_sum(nnx.merge(graphdef, s), batch, remat=remat)
        return total / count

    return jax.jit(jax.grad(loss)), state


def test_unrolled_layers_equal_scanned():
    model = tiny_model(seed=3)
    batch = _batch(model.config.vocab_size)
    scanned = np.asarray(model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]))
    model.scan_layers = False
    unrolled = np.asarray(model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]))
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)
    assert np.abs(scanned).max() > 0.1


@pytest.mark.parametrize("scan", [True, False])
def test_every_remat_policy_gives_the_same_gradients(scan):
    model = tiny_model(seed=4)
    model.scan_layers = scan
    batch = _batch(model.config.vocab_size)
    fn, state = _grad_fn(model, False)
    want = nnx.to_flat_state(fn(state, batch))
    for policy in REMAT_POLICIES[1:]:
        fn, state = _grad_fn(model, policy)
        got = dict(nnx.to_flat_state(fn(state, batch)))
        for path, w in want:
            w, g = np.asarray(w[...]), np.asarray(got[path][...])
            rel = np.linalg.norm(g - w) / np.linalg.norm(w)
            assert rel <= 1e-5, f"{policy} scan={scan}: {'/'.join(map(str, path))} differs by {rel:.2e}"


def test_remat_lowers_compiled_temporaries():
    """XLA's memory analysis of the gradient program: with scanned layers, remat keeps only each layer's
    input. (Unrolled layers do not gain on XLA:CPU, prevent_cse or not: BUILD_NOTES, issue 18.)"""
    model = tiny_model(seed=5, num_hidden_layers=4, intermediate_size=256)
    batch = _batch(model.config.vocab_size, rows=4, length=128)
    temps = {}
    for remat in (False, "nothing_saveable"):
        fn, state = _grad_fn(model, remat)
        temps[remat] = fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert temps["nothing_saveable"] < 0.7 * temps[False], temps
