"""Every attention backend that runs here equals the `reference` einsum path (and transformers).

Tiny random checkpoints of every family (tests/models/reference.py); fp32. `tpu_interpret` runs
the Pallas splash kernel in the Pallas interpreter (the `tpu` backend itself needs a TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.models.reference import KINDS, jax_logits, left_pad_mask, random_batch, torch_logits
from undo_jax.models import load_pretrained
from undo_jax.models.attention import AttentionError, attention
from undo_jax.models.decoder import set_attention
from undo_jax.train.step import completion_loss_sum

BACKENDS = ["chunked", "xla", pytest.param("tpu_interpret", marks=pytest.mark.slow)]
SAME = 1e-5  # max |logit diff| vs the reference backend
HF = 1e-4  # max |logit diff| vs transformers


def _packed_batch(vocab, seed=0):
    """Two rows packing 3 and 2 segments, with trailing padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((2, 24), np.int32)
    pos = np.zeros((2, 24), np.int32)
    for row, lengths in enumerate(([7, 9, 4], [11, 10])):
        start = 0
        for i, n in enumerate(lengths):
            seg[row, start:start + n] = i + 1
            pos[row, start:start + n] = np.arange(n)
            start += n
    ids = rng.integers(0, vocab, size=(2, 24)).astype(np.int32)
    return ids, seg, pos


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Chunked blocks of 8 keys: the 21-24 token batches span several blocks, the last one shifted."""
    monkeypatch.setattr("undo_jax.models.attention.DEFAULT_BLOCK", 8)


def _loaded(hf_checkpoint, kind, backend):
    hf_model, path = hf_checkpoint(kind)
    return hf_model, set_attention(load_pretrained(path), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_equal_reference_and_transformers(kind, backend, hf_checkpoint):
    hf_model, model = _loaded(hf_checkpoint, kind, backend)
    reference = set_attention(load_pretrained(hf_checkpoint(kind)[1]), "reference")
    vocab = model.config.vocab_size
    ids = random_batch(3, 21, vocab, seed=1)
    mask = left_pad_mask([21, 14, 5], 21)
    valid = mask.astype(bool)
    for m, where in ((None, np.ones_like(valid)), (mask, valid)):
        ours = jax_logits(model, ids, m)
        assert np.isfinite(ours).all()
        diff_ref = np.abs(ours - jax_logits(reference, ids, m))[where].max()
        diff_hf = np.abs(ours - torch_logits(hf_model, ids, m))[where].max()
        label = "left-padded" if m is not None else "random"
        assert diff_ref <= SAME, f"{kind}/{backend} {label}: {diff_ref:.3g} from the reference backend"
        assert diff_hf <= HF, f"{kind}/{backend} {label}: {diff_hf:.3g} from transformers"
    ids, seg, pos = _packed_batch(vocab)
    kw = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    ours, ref = jax_logits(model, ids, **kw), jax_logits(reference, ids, **kw)
    diff = np.abs(ours - ref)[seg > 0].max()
    assert diff <= SAME, f"{kind}/{backend} packed: {diff:.3g} from the reference backend"


def _loss_grads(model, batch):
    graphdef, state = nnx.split(model)

    def loss(s):
        total, count = completion_loss_sum(nnx.merge(graphdef, s), batch)
        return total / count

    return jax.grad(loss)(state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "qwen2_tied", "qwen3"])
def test_loss_gradients_equal_reference(kind, backend, hf_checkpoint):
    _, model = _loaded(hf_checkpoint, kind, backend)
    reference = set_attention(load_pretrained(hf_checkpoint(kind)[1]), "reference")
    ids, seg, pos = _packed_batch(model.config.vocab_size, seed=4)
    targets = np.roll(ids, -1, axis=1)
    loss_mask = (seg > 0) & (np.roll(seg, -1, axis=1) == seg)
    batch = {k: jnp.asarray(v) for k, v in dict(tokens=ids, targets=targets, loss_mask=loss_mask, segment_ids=seg,
                                                  positions=pos).items()}
    ours = nnx.to_flat_state(_loss_grads(model, batch))
    want = dict(nnx.to_flat_state(_loss_grads(reference, batch)))
    for path, g in ours:
        g, w = np.asarray(g[...]), np.asarray(want[path][...])
        rel = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
        assert rel <= SAME, f"{kind}/{backend} grad {'/'.join(map(str, path))}: relative difference {rel:.2e}"


@pytest.mark.parametrize("backend", ["reference", "chunked", "xla"])
def test_cached_decode_equals_full_forward(backend, hf_checkpoint, monkeypatch):
    """Prefill of left-padded prompts then token-by-token decode == one forward pass over the whole text,
    with chunked blocks smaller than the cache so several blocks (and the filled-prefix bound) are used."""
    _, model = _loaded(hf_checkpoint, "qwen3", backend)
    vocab = model.config.vocab_size
    p, n = 12, 9
    lengths = [12, 7, 3]
    ids = random_batch(3, p + n, vocab, seed=7).astype(np.int32)
    prompt_mask = left_pad_mask(lengths, p).astype(bool)
    positions = np.maximum(np.cumsum(prompt_mask, axis=1) - 1, 0).astype(np.int32)
    cache = model.init_cache(3, p + n)
    hidden, cache = model.prefill_hidden(jnp.asarray(ids[:, :p]), jnp.asarray(positions), cache,
                                         jnp.asarray(prompt_mask))
    step_logits = [model.logits_from_hidden(hidden[:, -1])]
    monkeypatch.setattr("undo_jax.models.attention.DEFAULT_BLOCK", 4)  # several blocks over a 21-slot cache
    for j in range(n - 1):
        pos = (np.asarray(lengths) + j)[:, None].astype(np.int32)
        logits, cache = model.decode_step(jnp.asarray(ids[:, p + j:p + j + 1]), jnp.asarray(pos), cache, p + j)
        step_logits.append(logits[:, 0])
    full_mask = np.concatenate([prompt_mask, np.ones((3, n), bool)], axis=1)
    full = jax_logits(model, ids, full_mask.astype(np.int32))
    for j, got in enumerate(step_logits):
        np.testing.assert_allclose(np.asarray(got), full[:, p - 1 + j], atol=SAME, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "chunked", "xla"])
def test_per_row_write_slots_equal_full_forward(backend, hf_checkpoint, monkeypatch):
    """Decode with a write slot per row (continuous batching's layout: each row's prompt in its own bucket,
    its tokens right after it) == one forward pass; stale valid entries left at the slots being written are
    never read."""
    _, model = _loaded(hf_checkpoint, "llama", backend)
    vocab = model.config.vocab_size
    buckets, lengths, n, s_len = [12, 4, 8], [12, 3, 6], 7, 12 + 7
    ids = random_batch(3, 12 + n, vocab, seed=11).astype(np.int32)
    cache = model.init_cache(3, s_len)
    rows = []
    for r, (p, length) in enumerate(zip(buckets, lengths, strict=True)):
        mask = np.zeros((1, p), bool)
        mask[0, p - length:] = True
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        small = model.init_cache(1, p)
        hidden, small = model.prefill_hidden(jnp.asarray(ids[r:r + 1, 12 - p:12]), jnp.asarray(pos), small,
                                             jnp.asarray(mask))
        cache = cache._replace(k=cache.k.at[:, r, :, :p].set(small.k[:, 0]),
                               v=cache.v.at[:, r, :, :p].set(small.v[:, 0]),
                               positions=cache.positions.at[r, :p].set(pos[0]),
                               valid=cache.valid.at[r, :p].set(mask[0]))
        rows.append(model.logits_from_hidden(hidden[0, -1]))
    step_logits = [jnp.stack(rows)]
    monkeypatch.setattr("undo_jax.models.attention.DEFAULT_BLOCK", 4)
    every = jnp.arange(3)
    for j in range(n - 1):
        pos = (np.asarray(lengths) + j)[:, None].astype(np.int32)
        column = jnp.asarray(np.asarray(buckets) + j, jnp.int32)
        # A stale entry where each row's new token goes (valid, position 0, large keys): it must be ignored.
        cache = cache._replace(valid=cache.valid.at[every, column].set(True),
                               k=cache.k.at[:, every, :, column].set(50.0))
        logits, cache = model.decode_step(jnp.asarray(ids[:, 12 + j:13 + j]), jnp.asarray(pos), cache, column)
        step_logits.append(logits[:, 0])
    for r, length in enumerate(lengths):  # row r alone: its real prompt, then its tokens
        text = np.concatenate([ids[r, 12 - length:12], ids[r, 12:]])[None]
        full = jax_logits(model, text, np.ones_like(text))
        for j, got in enumerate(step_logits):
            np.testing.assert_allclose(np.asarray(got[r]), full[0, length - 1 + j], atol=SAME, rtol=0,
                                       err_msg=f"row {r} token {j}")


def test_chunked_decode_skips_the_unfilled_tail():
    """Keys past kv_filled are never read: NaNs there do not reach the output."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
    k = np.asarray(rng.normal(size=(3, 2, 2, 40, 8)), np.float32)
    v = np.asarray(rng.normal(size=(3, 2, 2, 40, 8)), np.float32)
    k[:, :, :, 16:], v[:, :, :, 16:] = np.nan, np.nan
    kv_pos = np.tile(np.arange(40, dtype=np.int32), (2, 1))
    q_pos = np.full((2, 1), 15, np.int32)
    kw = dict(q_positions=q_pos, kv_positions=kv_pos, kv_valid=kv_pos < 16, layer=1)
    out = attention(q, jnp.asarray(k), jnp.asarray(v), backend="chunked", kv_filled=16, block_size=8, **kw)
    want = attention(q, jnp.asarray(np.nan_to_num(k)), jnp.asarray(np.nan_to_num(v)), backend="reference", **kw)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)


def test_sliding_window_equals_reference():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 20, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, 20, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 2, 20, 8)), jnp.float32)
    pos = np.tile(np.arange(20, dtype=np.int32), (2, 1))
    kw = dict(q_positions=pos, kv_positions=pos, sliding_window=5)
    want = np.asarray(attention(q, k, v, backend="reference", **kw))
    assert np.abs(want - np.asarray(attention(q, k, v, backend="reference", q_positions=pos,
                                                kv_positions=pos))).max() > 1e-3  # the window matters
    for backend in ("chunked", "xla"):
        got = attention(q, k, v, backend=backend, block_size=8, **kw)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_unknown_or_unrunnable_backend_is_a_one_line_error(hf_checkpoint):
    _, path = hf_checkpoint("llama")
    with pytest.raises(AttentionError, match=r"attention backend 'flash' is unknown; choose one of auto"):
        load_pretrained(path, attention="flash")
    if jax.default_backend() != "tpu":
        model = load_pretrained(path, attention="tpu")
        needs_tpu = r"backend 'tpu': the Pallas splash kernel needs a TPU \(this is cpu\)"
        with pytest.raises(AttentionError, match=needs_tpu):
            model(jnp.zeros((1, 8), jnp.int32))
    q = jnp.zeros((1, 1, 4, 8))
    k = jnp.zeros((1, 2, 16, 8))
    with pytest.raises(AttentionError, match=r"serves self-attention \(T == S\), got T=1 queries over S=16 keys"):
        attention(q, k, k, q_positions=jnp.zeros((1, 1), jnp.int32), kv_positions=jnp.zeros((1, 16), jnp.int32),
                  backend="tpu_interpret")
