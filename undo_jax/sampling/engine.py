"""Jitted cores of the sampler: one prefill and one on-device decode loop over a preallocated KV cache.

Layout of a batch (B rows, prompt bucket P, N new tokens, cache length S = P + N):
- prompts are left padded to P and written to cache slots 0..P-1 (`prompt_mask` marks real tokens);
- generated token j of a row sits at cache slot P + j and has RoPE position len(prompt) + j;
- the decode loop is a `lax.while_loop` that stops as soon as every row has finished.

The cache (`undo_jax.models.decoder.KVCache`) is donated to both functions and returned, so one
buffer serves every batch of the same shape. Stale entries from an earlier batch are harmless: the
prefill marks every slot past the prompt empty (`cache.valid`), and a decode step marks the slot it
writes valid before any query reads it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from undo_jax.sampling.sample import SamplingSettings, choose_tokens

# Finish codes returned per row by the decode loop.
FINISH_LENGTH, FINISH_END, FINISH_STOP = 0, 1, 2
# Never a token id: marks "no generated token yet" in the stop-sequence window.
_NO_TOKEN = -2
# Wildcard in the left-padded stop-sequence table.
_ANY_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Static parameters of one compiled decode loop."""

    max_new_tokens: int
    prompt_len: int  # the bucket P
    sampling: SamplingSettings
    stop_at_end: bool = True  # False: ignore end tokens (benchmarks run the full length)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, state, cache, input_ids, positions, prompt_mask):
    """-> (logits of the last prompt position [B, V] float32, cache with the prompts written).

    input_ids, positions [B, P] int32; prompt_mask [B, P] bool (False: left padding).
    """
    model = nnx.merge(graphdef, state)
    # Project only the last position onto the vocabulary (XLA does not push the slice through the matmul).
    hidden, cache = model.prefill_hidden(input_ids, positions, cache, prompt_mask)
    return model.logits_from_hidden(hidden[:, -1]), cache


def _stop_hits(window, stop_table):
    """window [B, L] last generated tokens, stop_table [K, L] left padded with _ANY_TOKEN -> [B] bool."""
    matches = (stop_table[None] == _ANY_TOKEN) | (window[:, None, :] == stop_table[None])
    return jnp.any(jnp.all(matches, axis=-1), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"), donate_argnames=("cache",))
def decode(graphdef, state, cache, first_logits, prompt_lengths, active, base_key, row_ids, end_ids,
           stop_table, *, settings: DecodeSettings):
    """Sample up to N tokens per row on the device.

    first_logits [B, V] (from `prefill`), prompt_lengths [B] int32 (real tokens per row),
    active [B] bool (False: batch padding, finished from the start),
    base_key: a typed PRNG key, row_ids [B, 2] int32 (prompt index, sample index): row r draws from
    fold_in(fold_in(base_key, prompt), sample), end_ids [E] int32 (padded with -1), stop_table [K, L] int32.
    Returns (tokens [B, N] int32, lengths [B] int32, finish [B] int32 FINISH_*, cache).
    A row's tokens are valid up to its length, which includes the token that finished it.
    """
    model = nnx.merge(graphdef, state)
    n, p = settings.max_new_tokens, settings.prompt_len
    b = first_logits.shape[0]
    row_keys = jax.vmap(lambda ids: jax.random.fold_in(jax.random.fold_in(base_key, ids[0]), ids[1]))(row_ids)

    def emit(i, tok, tokens, window, done, lengths, finish):
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)
        hit_end = jnp.any(tok[:, None] == end_ids[None, :], axis=-1) & settings.stop_at_end
        hit_stop = _stop_hits(window, stop_table)
        newly = ~done & (hit_end | hit_stop)
        finish = jnp.where(newly, jnp.where(hit_end, FINISH_END, FINISH_STOP), finish)
        lengths = jnp.where(newly, i + 1, lengths)
        return tokens, window, done | newly, lengths, finish

    tok = choose_tokens(first_logits, row_keys, 0, settings.sampling)
    tokens = jnp.zeros((b, n), jnp.int32)
    window = jnp.full((b, stop_table.shape[1]), _NO_TOKEN, jnp.int32)
    lengths = jnp.full((b,), n, jnp.int32)
    finish = jnp.full((b,), FINISH_LENGTH, jnp.int32)
    tokens, window, done, lengths, finish = emit(0, tok, tokens, window, ~active, lengths, finish)

    def cond(carry):
        i, _, _, _, done, _, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, tokens, done, lengths, finish, window = carry
        positions = (prompt_lengths + i - 1)[:, None]
        logits, cache = model.decode_step(tok[:, None], positions, cache, p + i - 1)
        tok = choose_tokens(logits[:, 0], row_keys, i, settings.sampling)
        tokens, window, done, lengths, finish = emit(i, tok, tokens, window, done, lengths, finish)
        return i + 1, tok, cache, tokens, done, lengths, finish, window

    carry = (jnp.int32(1), tok, cache, tokens, done, lengths, finish, window)
    _, _, cache, tokens, _, lengths, finish, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths, finish, cache
