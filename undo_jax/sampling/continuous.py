"""Continuous batching: a fixed number of decode slots, refilled with waiting prompts as rows finish.

The static engine runs each batch until its longest row ends, so slots whose row stopped early idle
until then. Here the decode batch is a set of B slots, each with its own fill level in the shared
KV cache [L, B, KV, S, Dh]: the device runs `steps` decode steps (`lax.while_loop`), the host then
retires the finished slots and inserts waiting prompts into them (one jitted prefill per prompt-length
bucket, several prompts per insert), and so on until every row is done.

A slot's prompt (left padded to its bucket P) sits in cache slots 0..P-1 and its generated tokens follow at
P, P+1, ... (`Slots.base` = P): each row writes its own column. The layer scan only reads the cache and the new
keys are written after it (one in-place slice update per row and step, `CausalLM.decode_hidden`), and attention
visits the blocks below the longest live row's fill, not the whole cache. An insert marks the slot's old
entries invalid. S = P_max + max_new_tokens.

A row's sampling key is fold_in(fold_in(seed key, prompt index), sample index), folded with the index of the
token in the row, exactly as in the static engine: what a row samples does not
depend on which slot ran it, or when.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from undo_jax.models.decoder import KVCache
from undo_jax.sampling import engine
from undo_jax.sampling.sample import SamplingSettings, filter_logits

DEFAULT_STEPS_PER_REFILL = 8


@dataclasses.dataclass(frozen=True)
class SlotSettings:
    """Static parameters of the compiled insert and decode functions."""

    max_new_tokens: int
    sampling: SamplingSettings
    stop_at_end: bool = True
    steps: int = DEFAULT_STEPS_PER_REFILL  # decode steps per device call between refills


class Slots(NamedTuple):
    """Per-slot decode state on the device (leading axis: the B slots)."""

    tok: jax.Array  # [B] int32: the last emitted token, input of the next step
    position: jax.Array  # [B] int32: RoPE position of `tok`
    step: jax.Array  # [B] int32: tokens emitted so far (index of the next one)
    base: jax.Array  # [B] int32: cache column of the row's first generated token (its prompt bucket)
    done: jax.Array  # [B] bool: finished, or free
    keys: jax.Array  # [B] typed PRNG keys of the rows
    tokens: jax.Array  # [B, N] int32
    window: jax.Array  # [B, W] int32: last tokens, for stop sequences
    lengths: jax.Array  # [B] int32
    finish: jax.Array  # [B] int32 FINISH_*


def empty_slots(batch: int, max_new_tokens: int, window: int, seed_key) -> Slots:
    """Every slot free (done). Each field is its own buffer: the slot state is donated whole."""
    def zeros():
        return jnp.zeros((batch,), jnp.int32)

    return Slots(zeros(), zeros(), zeros(), zeros(), jnp.ones((batch,), bool), jax.random.split(seed_key, batch),
                 jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.full((batch, window), engine._NO_TOKEN, jnp.int32),
                 jnp.full((batch,), max_new_tokens, jnp.int32), zeros())


def _choose(logits, keys, steps, sampling: SamplingSettings):
    """Tokens [B] from logits [B, V]; row b draws with fold_in(keys[b], steps[b]) (its own token index)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)


def _emit(s: Slots, tok, live, end_ids, stop_table, settings: SlotSettings) -> Slots:
    """Record token `tok` of every live row at its own index; finish rows at an end token, a stop
    sequence or max_new_tokens."""
    n = settings.max_new_tokens
    rows = jnp.arange(tok.shape[0])
    index = jnp.minimum(s.step, n - 1)
    tokens = s.tokens.at[rows, index].set(jnp.where(live, tok, s.tokens[rows, index]))
    window = jnp.where(live[:, None], jnp.concatenate([s.window[:, 1:], tok[:, None]], axis=1), s.window)
    hit_end = jnp.any(tok[:, None] == end_ids[None, :], axis=-1) & settings.stop_at_end
    hit_stop = engine._stop_hits(window, stop_table)
    full = s.step + 1 >= n
    newly = live & (hit_end | hit_stop | full)
    code = jnp.where(hit_end, engine.FINISH_END, jnp.where(hit_stop, engine.FINISH_STOP, engine.FINISH_LENGTH))
    return s._replace(
        tok=jnp.where(live, tok, s.tok), step=s.step + live, tokens=tokens, window=window,
        done=s.done | newly, lengths=jnp.where(newly, s.step + 1, s.lengths),
        finish=jnp.where(newly, code, s.finish))


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"), donate_argnames=("cache", "slots"))
def insert(graphdef, state, cache: KVCache, slots: Slots, slot_ids, input_ids, positions, prompt_mask,
           real_lengths, row_ids, base_key, end_ids, stop_table, *, settings: SlotSettings):
    """Prefill n prompts (left padded to one bucket P) and put them into slots `slot_ids` [n].

    Each inserted row's first token is sampled from its last prompt position, as in the static engine.
    """
    model = nnx.merge(graphdef, state)
    n, p = input_ids.shape
    small = model.init_cache(n, p, dtype=cache.k.dtype)
    hidden, small = model.prefill_hidden(input_ids, positions, small, prompt_mask)
    logits = model.logits_from_hidden(hidden[:, -1])
    s_len = cache.valid.shape[1]
    cache = KVCache(
        cache.k.at[:, slot_ids, :, :p].set(small.k),
        cache.v.at[:, slot_ids, :, :p].set(small.v),
        cache.positions.at[slot_ids, :p].set(positions.astype(jnp.int32)),
        cache.valid.at[slot_ids].set(jnp.concatenate([prompt_mask, jnp.zeros((n, s_len - p), bool)], 1)),
    )
    keys = jax.vmap(lambda ids: jax.random.fold_in(jax.random.fold_in(base_key, ids[0]), ids[1]))(row_ids)
    zeros = jnp.zeros((n,), jnp.int32)
    fresh = Slots(zeros, real_lengths.astype(jnp.int32), zeros, jnp.full((n,), p, jnp.int32), jnp.zeros((n,), bool),
                  keys, jnp.zeros((n, settings.max_new_tokens), jnp.int32),
                  jnp.full((n, slots.window.shape[1]), engine._NO_TOKEN, jnp.int32),
                  jnp.full((n,), settings.max_new_tokens, jnp.int32), zeros)
    first = _choose(logits, keys, zeros, settings.sampling)
    fresh = _emit(fresh, first, jnp.ones((n,), bool), end_ids, stop_table, settings)
    slots = jax.tree.map(lambda whole, part: whole.at[slot_ids].set(part), slots, fresh)
    return cache, slots


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"), donate_argnames=("cache", "slots"))
def decode(graphdef, state, cache: KVCache, slots: Slots, end_ids, stop_table, *, settings: SlotSettings):
    """Up to `settings.steps` decode steps for every live slot; stops early when all are done.
    -> (cache, slots)."""
    model = nnx.merge(graphdef, state)

    def cond(carry):
        i, _, s = carry
        return (i < settings.steps) & ~jnp.all(s.done)

    def body(carry):
        i, cache, s = carry
        live = ~s.done
        column = s.base + s.step - 1  # where the input token (the row's token step - 1) goes
        filled = jnp.max(jnp.where(live, column, 0))  # every live row's earlier slots lie below
        logits, cache = model.decode_step(s.tok[:, None], s.position[:, None], cache, column, kv_filled=filled)
        tok = _choose(logits[:, 0], s.keys, s.step, settings.sampling)
        s = s._replace(position=s.position + live)
        return i + 1, cache, _emit(s, tok, live, end_ids, stop_table, settings)

    _, cache, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, slots))
    return cache, slots


def _power_of_two_parts(items: list) -> list[list]:
    """items cut into runs of 2^k, largest first: 13 items -> 8, 4, 1."""
    parts, start = [], 0
    for k in reversed(range(len(items).bit_length())):
        if len(items) >> k & 1:
            parts.append(items[start:start + (1 << k)])
            start += 1 << k
    return parts


def run(model, place, prompt_ids, rows, *, slots: int, max_new_tokens: int, sampling: SamplingSettings,
        end_table, stop_table, base_key, stop_at_end: bool, steps: int, on_done, bucket) -> dict[str, float]:
    """Generate every row [(prompt index, sample index)] through `slots` decode slots.

    on_done(row, tokens, code) is called for each finished row. Returns occupancy figures:
    {"slot_steps", "live_slot_steps", "device_calls"}.
    """
    graphdef, state = nnx.split(model)
    state = place.params(state)
    settings = SlotSettings(max_new_tokens, sampling, stop_at_end, steps)
    lengths = [len(prompt_ids[p]) for p, _ in rows]
    s_len = max(bucket(n) for n in lengths) + max_new_tokens
    cache = place.new_cache(model, slots, s_len)
    window = stop_table.shape[1]
    state_slots = place.slot_state(empty_slots(slots, max_new_tokens, window, jax.random.key(0)))
    # Longest prompts first: they are the ones that would otherwise start last and end the run alone.
    queue = deque(sorted(range(len(rows)), key=lambda r: (-lengths[r], r)))
    owner: list[int | None] = [None] * slots
    # Slot-steps: decode steps x slots the device ran; live ones produced a token of an unfinished row
    # (each row's first token comes from its insert's prefill, not from a decode step).
    stats = {"slot_steps": 0, "live_slot_steps": 0, "device_calls": 0}
    while queue or any(o is not None for o in owner):
        free = [b for b in range(slots) if owner[b] is None]
        if queue and free:
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            by_bucket: dict[int, list[int]] = {}
            for r in take:
                by_bucket.setdefault(bucket(lengths[r]), []).append(r)
            for p, bucket_rows in sorted(by_bucket.items(), reverse=True):
                # Inserts of 2^k prompts (13 = 8 + 4 + 1): a few compiled shapes, and no prefill spent on
                # padding rows (a prompt's prefill costs as much as tens of decode slot-steps).
                for group in _power_of_two_parts(bucket_rows):
                    n = len(group)
                    ids = np.zeros((n, p), np.int32)
                    mask = np.zeros((n, p), bool)
                    real = np.ones(n, np.int32)
                    row_ids = np.zeros((n, 2), np.int32)
                    slot_ids = np.zeros(n, np.int32)
                    for j, r in enumerate(group):
                        prompt = prompt_ids[rows[r][0]]
                        ids[j, p - len(prompt):] = prompt
                        mask[j, p - len(prompt):] = True
                        real[j], row_ids[j] = len(prompt), rows[r]
                        slot_ids[j] = free.pop(0)
                        owner[slot_ids[j]] = r
                    positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)
                    cache, state_slots = insert(graphdef, state, cache, state_slots, *map(place.whole, (
                        slot_ids, ids, positions, mask, real, row_ids)), base_key, end_table, stop_table,
                        settings=settings)
                    stats["device_calls"] += 1
        before = place.host(state_slots.step)
        cache, state_slots = decode(graphdef, state, cache, state_slots, end_table, stop_table, settings=settings)
        stats["device_calls"] += 1
        done, step = place.host(state_slots.done), place.host(state_slots.step)
        live_steps = int(np.sum(step - before))
        ran = int(np.max(step - before)) if live_steps else 0
        stats["slot_steps"] += ran * slots
        stats["live_slot_steps"] += live_steps
        finished = [b for b in range(slots) if owner[b] is not None and done[b]]
        if finished:
            tokens, out_len, finish = (place.host(x) for x in (state_slots.tokens, state_slots.lengths,
                                                                state_slots.finish))
            for b in finished:
                on_done(owner[b], tokens[b, :out_len[b]], int(finish[b]))
                owner[b] = None
    return stats
