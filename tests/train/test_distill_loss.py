"""Distillation losses against a float64 numpy reference, TRL's generalized JSD, and jax.grad of a reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import tiny_model
from undo_jax.train import step as sft
from undo_jax.train.distill_loss import (
    DistillSettings,
    distill_loss_sum,
    divergence,
    sparse_top_k,
    student_buckets,
    teacher_buckets,
    token_distill_loss,
)

VOCAB = 64
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]


def _logits(seed, shape=(5, 7, VOCAB), scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


# ------------------------------------------------------------- float64 numpy reference (full support)
def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(lp, lq):
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_divergence(teacher_logits, student_logits, kind, beta, temperature):
    p = _np_log_softmax(teacher_logits.astype(np.float64) / temperature)
    q = _np_log_softmax(student_logits.astype(np.float64) / temperature)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _np_kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _np_kl(q, p)
    m = np.log(beta * np.exp(p) + (1 - beta) * np.exp(q))
    return beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)


def _ours_full(teacher_logits, student_logits, kind, beta, temperature):
    lp, ids, tail = sparse_top_k(jnp.asarray(teacher_logits), VOCAB)
    p = teacher_buckets(lp, tail, temperature)
    q = student_buckets(jnp.asarray(student_logits), ids, temperature, full_support=True)
    return np.asarray(divergence(p, q, kind, beta))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_full_support_equals_float64_reference(kind, beta, temperature):
    t, s = _logits(0), _logits(1)
    ref = np_divergence(t, s, kind, beta, temperature)
    assert ref.min() > 1e-3  # the distributions really differ
    with jax.enable_x64(True):  # the math itself, to float64 rounding
        exact = _ours_full(t.astype(np.float64), s.astype(np.float64), kind, beta, temperature)
    np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-10)
    # The float32 path the trainer runs: within float32 rounding of values up to ~10.
    np.testing.assert_allclose(_ours_full(t, s, kind, beta, temperature), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_equals_trl_generalized_jsd(beta, temperature):
    torch = pytest.importorskip("torch")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    t, s = _logits(2), _logits(3)
    labels = np.random.default_rng(4).integers(0, VOCAB, t.shape[:2])
    labels[0, :3] = -100  # prompt / padding positions that TRL (and our mask) ignore
    theirs = gkd.GKDTrainer.generalized_jsd_loss(torch.from_numpy(s), torch.from_numpy(t),
                                                 labels=torch.from_numpy(labels), beta=beta,
                                                 temperature=temperature).item()
    per_token = _ours_full(t, s, "jsd", beta, temperature)
    mask = labels != -100
    ours = float((per_token * mask).sum() / mask.sum())
    assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (ours, theirs)


def _reference_loss(student_logits, teacher_logits, targets, mask, settings):
    """The same loss written directly on full softmaxes (no buckets), for gradient checks."""
    t = settings.temperature
    p = jax.nn.log_softmax(teacher_logits / t)
    q = jax.nn.log_softmax(student_logits / t)
    kd = divergence(p, q, settings.divergence, settings.beta)
    log_z = jax.nn.logsumexp(student_logits, -1)
    ce = log_z - jnp.take_along_axis(student_logits, targets[..., None], -1)[..., 0]
    return jnp.sum((settings.alpha * ce + (1 - settings.alpha) * t * t * kd) * mask)


@pytest.mark.parametrize("kind,beta", CASES)
def test_gradients_equal_reference(kind, beta):
    settings = DistillSettings(alpha=0.3, temperature=2.0, divergence=kind, beta=beta)
    t, s = jnp.asarray(_logits(5)), jnp.asarray(_logits(6))
    targets = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, t.shape[:2]))
    mask = jnp.asarray(np.random.default_rng(8).random(t.shape[:2]) > 0.3, jnp.float32)
    lp, ids, tail = sparse_top_k(t, VOCAB)

    def ours(x):
        ce, kd = token_distill_loss(x, targets, lp, ids, tail, settings, full_support=True)
        return jnp.sum((settings.alpha * ce + (1 - settings.alpha) * 4.0 * kd) * mask)

    g_ours = jax.grad(ours)(s)
    g_ref = jax.grad(_reference_loss)(s, t, targets, mask, settings)
    np.testing.assert_allclose(ours(s), _reference_loss(s, t, targets, mask, settings), rtol=1e-6)
    scale = float(jnp.abs(g_ref).max())
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("kind,beta", CASES)
def test_sparse_top_k_converges_to_full(kind, beta):
    # A peaked teacher (as a trained LM is): most mass in few tokens, a long flat tail.
    rng = np.random.default_rng(9)
    t = rng.normal(0, 1, (4, 6, VOCAB)).astype(np.float32)
    t[..., :8] += 6.0
    s = _logits(10, shape=t.shape, scale=2.0)
    full = np_divergence(t, s, kind, beta, 1.0)
    errors = []
    for k in (1, 4, 16, 48, VOCAB):
        lp, ids, tail = sparse_top_k(jnp.asarray(t), k)
        p = teacher_buckets(lp, tail, 1.0)
        q = student_buckets(jnp.asarray(s), ids, 1.0, full_support=k == VOCAB)
        errors.append(float(np.abs(np.asarray(divergence(p, q, kind, beta)) - full).mean()))
    assert errors[-1] < 1e-5, errors  # float32 rounding of divergences up to ~5
    assert errors[0] > 10 * errors[3], errors  # top-1 + tail is coarse; top-48 is close
    assert all(b <= a + 1e-6 for a, b in zip(errors[1:], errors[2:], strict=False)), errors


def test_buckets_are_distributions_and_tail_is_exact():
    t = jnp.asarray(_logits(11))
    lp, ids, tail = sparse_top_k(t, 5)
    full = _np_log_softmax(np.asarray(t, np.float64))
    np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(full, np.asarray(ids), -1), atol=1e-6)
    mass_out = 1 - np.exp(np.take_along_axis(full, np.asarray(ids), -1)).sum(-1)
    np.testing.assert_allclose(np.exp(np.asarray(tail)), mass_out, rtol=1e-5)
    for temp in (1.0, 2.0):
        np.testing.assert_allclose(np.exp(np.asarray(teacher_buckets(lp, tail, temp))).sum(-1), 1.0, atol=1e-6)
        q = student_buckets(jnp.asarray(_logits(12)), ids, temp)
        np.testing.assert_allclose(np.exp(np.asarray(q)).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(divergence="kl"), dict(alpha=1.5), dict(temperature=0.0), dict(beta=-0.1)])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="kd ") as info:
        DistillSettings(**bad)
    assert "\n" not in str(info.value)


def _batch(seed, rows=2, length=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128, (rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    mask[:, 5:] = 1.0
    mask[1, -2:] = 0.0  # padding
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones((rows, length), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))}


@pytest.fixture(scope="module")
def student_and_teacher():
    return tiny_model(seed=1), tiny_model(seed=2)


def test_model_loss_chunked_equals_whole_and_alpha_one_is_sft(student_and_teacher):
    student, teacher = student_and_teacher
    batch = _batch(0)
    lp, ids, tail = sparse_top_k(teacher(batch["tokens"], positions=batch["positions"]), 8)
    sparse = {"top_logp": lp, "top_ids": ids, "log_tail": tail}
    settings = DistillSettings(alpha=0.4, temperature=2.0, divergence="jsd", beta=0.5)
    whole, parts = distill_loss_sum(student, batch, sparse, settings)
    chunked, parts_c = distill_loss_sum(student, batch, sparse, settings, chunk=5)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    assert float(parts["count"]) == float(batch["loss_mask"].sum())
    assert float(parts["kd_sum"]) > 0
    sft_sum, count = sft.completion_loss_sum(student, batch)
    np.testing.assert_allclose(float(parts["ce_sum"]), float(sft_sum), rtol=1e-6)
    only_ce, _ = distill_loss_sum(student, batch, sparse, DistillSettings(alpha=1.0))
    np.testing.assert_allclose(float(only_ce), float(sft_sum), rtol=1e-6)
    # Distilling a model into itself with full support costs nothing beyond the CE term.
    lp, ids, tail = sparse_top_k(student(batch["tokens"], positions=batch["positions"]), 128)
    _, self_parts = distill_loss_sum(student, batch, {"top_logp": lp, "top_ids": ids, "log_tail": tail}, settings)
    assert abs(float(self_parts["kd_sum"])) < 1e-4
