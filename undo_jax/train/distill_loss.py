"""White-box distillation losses: the teacher's sparse next-token distribution against the student's.

The teacher is stored sparsely per completion token: the log-probabilities of its top-k tokens (at
temperature 1), their ids, and the log of the mass it puts on every other token (the tail). Both
distributions are compared over the k + 1 buckets {top-k ids, tail}; with k = vocab the tail is empty
and every divergence is the exact full-vocabulary one.

Temperature T: the student's logits are divided by T before its log-softmax; the teacher's bucket
log-probs (the tail as one pseudo-token) are divided by T and renormalised over the buckets. That is
exact for the top-k part when k = vocab and an approximation of the tail otherwise (how the tail's mass
sharpens depends on its unknown composition).

Divergences (per token, P = teacher buckets, Q = student buckets), with TRL's GKD conventions:
  forward  KL(P || Q)          (mass-covering; = generalized JSD with beta = 0)
  reverse  KL(Q || P)          (mode-seeking; = generalized JSD with beta = 1)
  jsd      beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q,  0 < beta < 1
The training loss per completion token is `alpha * CE(gold) + (1 - alpha) * T^2 * D`, summed with the
completion mask as weight (token-weighted, like the SFT loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# A stored tail never reaches log 0 while k < vocab (float32 rounding can make it underflow for a very
# peaked teacher, which would make reverse KL infinite); a floor of float32's smallest normal keeps it finite.
_LOG_TINY = math.log(float(jnp.finfo(jnp.float32).tiny))


@dataclass(frozen=True)
class DistillSettings:
    """How the distillation term is formed; `alpha = 1` is plain SFT."""

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5  # for divergence="jsd"

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"kd divergence {self.divergence!r}: use one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"kd temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"kd beta must be in [0, 1], got {self.beta}")


def _at_least_f32(x):
    """float32 for bf16/f16/f32 inputs; float64 stays float64 (the tests' exact reference runs in x64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------- sparse teacher
def sparse_top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(top-k log-probs [..., k], their ids int32 [..., k], log tail mass [...]) of softmax(logits), in float32."""
    logits = _at_least_f32(logits)
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k must be in [1, vocab={vocab}], got {k}")
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    top, ids = jax.lax.top_k(logits, k)
    return top - log_z, ids.astype(jnp.int32), _log_tail(logits, ids, log_z[..., 0], full_support=k == vocab)


def _log_tail(logits, ids, log_z, *, full_support: bool):
    """log of the softmax mass outside `ids` (an exact logsumexp over the other logits, never 1 - sum).

    With full support the tail is empty: a constant log 0 (a logsumexp over nothing but -inf would give
    NaN gradients).
    """
    if full_support:
        return jnp.full(log_z.shape, -jnp.inf, log_z.dtype)
    others = jnp.put_along_axis(logits, ids, -jnp.inf, axis=-1, inplace=False)
    return jnp.maximum(jax.nn.logsumexp(others, axis=-1) - log_z, _LOG_TINY)


def teacher_buckets(top_logp: jax.Array, log_tail: jax.Array, temperature: float) -> jax.Array:
    """The teacher's log-probs over the k + 1 buckets at `temperature`, [..., k + 1]."""
    buckets = _at_least_f32(jnp.concatenate([top_logp, log_tail[..., None]], axis=-1))
    if temperature == 1.0:
        return buckets
    return jax.nn.log_softmax(buckets / temperature, axis=-1)


def student_buckets(logits: jax.Array, ids: jax.Array, temperature: float, *, full_support: bool = False
                    ) -> jax.Array:
    """The student's log-probs over the teacher's k + 1 buckets at `temperature`, [..., k + 1].

    `full_support`: the teacher's ids cover the whole vocabulary (the tail bucket is empty).
    """
    scaled = _at_least_f32(logits) / temperature
    log_z = jax.nn.logsumexp(scaled, axis=-1)
    top = jnp.take_along_axis(scaled, ids, axis=-1) - log_z[..., None]
    return jnp.concatenate([top, _log_tail(scaled, ids, log_z, full_support=full_support)[..., None]], axis=-1)


# ---------------------------------------------------------------- divergences
def _kl(log_p, log_q):
    """KL(p || q) over the last axis; buckets with p = 0 contribute 0 (also where q = 0 there)."""
    p = jnp.exp(log_p)
    diff = jnp.where(p > 0, log_p - log_q, 0.0)
    return jnp.sum(p * diff, axis=-1)


def divergence(teacher_log: jax.Array, student_log: jax.Array, kind: str, beta: float = 0.5) -> jax.Array:
    """Per-token divergence between bucket (or full) log-distributions; see the module docstring."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_log, student_log)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_log, teacher_log)
    if kind != "jsd":
        raise ValueError(f"kd divergence {kind!r}: use one of {', '.join(DIVERGENCES)}")
    mix = jnp.logaddexp(teacher_log + math.log(beta), student_log + math.log1p(-beta))
    return beta * _kl(teacher_log, mix) + (1.0 - beta) * _kl(student_log, mix)


# ---------------------------------------------------------------- per-token loss
def token_distill_loss(logits, targets, top_logp, top_ids, log_tail, settings: DistillSettings,
                       *, full_support: bool = False):
    """(per-token CE on gold targets, per-token divergence) for logits [..., vocab]; both float32 [...].

    `full_support`: the teacher's ids cover the whole vocabulary (the tail bucket is empty).
    """
    logits = _at_least_f32(logits)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    ce = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    t = settings.temperature
    p = teacher_buckets(top_logp, log_tail, t)
    q = student_buckets(logits, top_ids, t, full_support=full_support)
    return ce, divergence(p, q, settings.divergence, settings.beta)


def combine(ce, kd, settings: DistillSettings):
    """alpha * CE + (1 - alpha) * T^2 * D (T^2 keeps the gradient scale of D independent of T, as in Hinton et al.)."""
    return settings.alpha * ce + (1.0 - settings.alpha) * settings.temperature ** 2 * kd


def distill_loss_sum(model, batch: dict[str, jax.Array], teacher: dict[str, jax.Array], settings: DistillSettings,
                     *, remat: bool | str = False, chunk: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum of the masked per-token loss, {"count", "ce_sum", "kd_sum"}) for one micro-batch.

    teacher: {"top_logp" [R, T, k], "top_ids" [R, T, k], "log_tail" [R, T]} aligned with batch["targets"]
    (positions outside the completion mask are ignored), optionally "ce_mask" [R, T]: where the CE term counts
    (default: the completion mask; 0 on on-policy samples, which have no gold tokens). With `chunk` > 0 the
    [tokens, vocab] logits are made `chunk` tokens at a time and recomputed in the backward pass, so one chunk of
    them is alive at once.
    """
    hidden = model.hidden_states(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                 remat=remat)
    mask = batch["loss_mask"].astype(jnp.float32)
    r, t, d = hidden.shape
    n, k = r * t, teacher["top_ids"].shape[-1]
    full = k >= model.config.vocab_size

    ce_mask = teacher["ce_mask"].astype(jnp.float32) if "ce_mask" in teacher else mask

    def sums(h, y, lp, ids, tail, m, ce_m):
        ce, kd = token_distill_loss(model.logits_from_hidden(h), y, lp, ids, tail, settings, full_support=full)
        return jnp.stack([jnp.sum(ce * ce_m), jnp.sum(kd * m)])

    flat = (hidden.reshape(n, d), batch["targets"].reshape(n), teacher["top_logp"].reshape(n, k),
            teacher["top_ids"].reshape(n, k), teacher["log_tail"].reshape(n), mask.reshape(n), ce_mask.reshape(n))
    if chunk <= 0 or chunk >= n:
        totals = sums(*flat)
    else:
        num_chunks = math.ceil(n / chunk)
        pad = num_chunks * chunk - n
        # Padded rows have mask 0; their tail is set to 0 (a valid log-prob) so no NaN enters the sums.
        chunks = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(num_chunks, chunk, *x.shape[1:])
                       for x in flat)
        one = jax.checkpoint(sums)
        totals, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.zeros((2,), jnp.float32), chunks)
    ce_sum, kd_sum = totals[0], totals[1]
    return combine(ce_sum, kd_sum, settings), {"count": jnp.sum(mask), "ce_sum": ce_sum, "kd_sum": kd_sum}
