"""Next-token choice from logits: greedy, temperature, top-k and top-p, with explicit PRNG keys.

Pure functions, traced inside the jitted decode loop. The order of the filters follows
transformers' logits warpers: temperature first, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static (hashable) sampling parameters; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, settings: SamplingSettings) -> jax.Array:
    """logits [B, V] float32 -> temperature-scaled logits with excluded tokens set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability mass reaches top_p
    (the most likely token is always kept); tokens tied with the last kept logit are kept too.
    """
    logits = logits.astype(jnp.float32) / settings.temperature
    vocab = logits.shape[-1]
    top_k = settings.top_k if 0 < settings.top_k < vocab else 0
    if top_k:
        # Sorted candidates come for free from top_k; top-p then only looks at these k.
        candidates = jax.lax.top_k(logits, top_k)[0]
        logits = jnp.where(logits < candidates[:, -1:], -jnp.inf, logits)
    elif settings.top_p < 1.0:
        candidates = -jnp.sort(-logits, axis=-1)
    if settings.top_p < 1.0:
        probs = jax.nn.softmax(candidates, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.sum(mass_before < settings.top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(candidates, num_kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def choose_tokens(logits: jax.Array, row_keys: jax.Array, step, settings: SamplingSettings) -> jax.Array:
    """logits [B, V], row_keys [B] typed keys, step int -> tokens [B] int32.

    Each row draws from its own key folded with the step, so a row's sample does not depend on
    which other rows share its batch (batch size, sort order and sharding leave it unchanged).
    """
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, settings)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
