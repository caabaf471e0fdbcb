"""Batched generation with a KV cache: prompts in, completions out (in input order).

Host side of the sampler: prompt rendering and tokenization, length-sorted batching with prompt
length buckets (a handful of compilations serve a whole dataset), device placement, and turning the
device's token buffers into `Completion`s (end tokens and stop strings stripped). The jitted prefill
and decode loop live in `undo_jax.sampling.engine`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from undo_jax.chat import is_messages, render_prompt
from undo_jax.models.decoder import KVCache
from undo_jax.progress import progress_bar
from undo_jax.sampling import continuous, engine
from undo_jax.sampling import engine as static_engine
from undo_jax.sampling.memory import check_fits
from undo_jax.sampling.sample import SamplingSettings

__all__ = ["DEFAULT_BATCH_SIZE", "ENGINES", "Completion", "end_token_ids", "generate", "prompt_bucket",
           "render_prompts"]

DEFAULT_BATCH_SIZE = 32
# "static": each batch runs until its longest row ends; "continuous": finished slots are refilled.
ENGINES = ("static", "continuous")
# The batch dimension is split over these mesh axes (the same as the trainer's batches).
BATCH_AXES = ("data", "fsdp")
# Special tokens that end a turn or a document in the supported families; any present in the
# vocabulary stops generation, besides the tokenizer's and the config's eos ids.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>")
_MIN_BUCKET = 16
_NEVER_TOKEN = -3  # fills unused rows of the stop table: matches nothing


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated continuation.

    text: decoded continuation without the end token and cut before the first stop string.
    token_ids: generated ids, including the end token (eos) or the token that completed the stop
    string (stop); all generated ids when finish_reason is 'length'.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # 'eos' | 'stop' | 'length'


def prompt_bucket(length: int, minimum: int = _MIN_BUCKET) -> int:
    """Smallest of minimum, 2^k and 1.5 * 2^k that holds `length` (at most 1.5x padding)."""
    n = max(length, minimum)
    power = 1 << (n - 1).bit_length()
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters >= n and three_quarters >= minimum else power


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_token_ids(prompt) -> bool:
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer)
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt))


def render_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt: strings as given (no special tokens added), message lists rendered by
    `undo_jax.chat.render_prompt` (the trainer's rendering), token-id sequences used as they are (the
    trainer's on-policy samples continue exactly the prompt ids it trains on)."""
    if isinstance(prompts, str | Mapping) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings or of chat message lists, got {type(prompts).__name__}")
    texts, at, given = [], [], {}
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
            at.append(i)
        elif is_messages(prompt) and len(prompt) > 0:
            texts.append(render_prompt(tokenizer, prompt))
            at.append(i)
        elif _is_token_ids(prompt):
            given[i] = [int(t) for t in prompt]
        else:
            raise TypeError(
                f"prompts[{i}]: expected a string, a non-empty list of {{'role', 'content'}} dicts or of token ids, "
                f"got {type(prompt).__name__}"
            )
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for i, row in zip(at, ids, strict=True):
        if not row:
            raise ValueError(f"prompts[{i}] tokenizes to no tokens; generation needs at least one prompt token")
        given[i] = list(row)
    return [given[i] for i in range(len(prompts))]


def end_token_ids(tokenizer, config=None) -> tuple[int, ...]:
    """Every id that ends generation: the tokenizer's eos, the model config's eos ids and the
    END_TOKENS present in the vocabulary."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if config is not None:
        ids.update(int(i) for i in config.eos_token_ids)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return tuple(sorted(ids))


@dataclasses.dataclass(frozen=True)
class _Batch:
    rows: tuple[int, ...]  # indices into the row list; fewer than `size` when padded
    size: int  # B
    prompt_len: int  # bucket P


def _plan_batches(lengths: Sequence[int], batch_size: int, shards: int) -> list[_Batch]:
    """Rows sorted by length (longest first), cut into batches of one size, each with its bucket."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    size = batch_size if len(order) >= batch_size else min(batch_size, _next_power_of_two(len(order)))
    size = math.ceil(size / shards) * shards
    return [
        _Batch(tuple(chunk), size, prompt_bucket(lengths[chunk[0]]))
        for chunk in (order[i : i + size] for i in range(0, len(order), size))
    ]


def _stop_table(tokenizer, stop: Sequence[str]) -> np.ndarray:
    """[K, L] int32: each stop string's token ids right aligned, left padded with the wildcard.

    This lets the device end a row early when the canonical tokenization of a stop string appears;
    the exact (text-level) cut is made on the host, so other tokenizations are still honoured.
    """
    seqs = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in stop]
    seqs = [s for s in seqs if s]
    k = _next_power_of_two(max(len(seqs), 1))
    width = _next_power_of_two(max((len(s) for s in seqs), default=1))
    table = np.full((k, width), engine._ANY_TOKEN, np.int32)
    table[len(seqs) :, -1] = _NEVER_TOKEN
    for r, seq in enumerate(seqs):
        table[r, width - len(seq) :] = seq
    return table


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _completion(tokenizer, ids: np.ndarray, code: int, stop: Sequence[str]) -> Completion:
    ids = [int(t) for t in ids]
    text_ids = ids[:-1] if code == engine.FINISH_END else ids
    reason = {engine.FINISH_END: "eos", engine.FINISH_STOP: "stop", engine.FINISH_LENGTH: "length"}[code]
    text = _decode(tokenizer, text_ids)
    cut = _first_stop(text, stop)
    if cut is not None:
        # Keep the ids up to the token that completes the stop string (the shortest prefix whose text holds it).
        lo, hi = 1, len(text_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(_decode(tokenizer, text_ids[:mid]), stop) is not None:
                hi = mid
            else:
                lo = mid + 1
        ids, text, reason = text_ids[:hi], text[:cut], "stop"
    return Completion(text=text, token_ids=tuple(ids), finish_reason=reason)


class _Placement:
    """Where batch arrays, the cache and the params go: one device, or a mesh with the batch split
    over its data axes (params stay where the loader put them, or are replicated when they are not
    on the mesh)."""

    def __init__(self, mesh: Mesh | None, config):
        self.mesh = mesh
        if mesh is None:
            self.shards = 1
            self.devices = [jax.devices()[0]]
            return
        axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        self.shards = math.prod(mesh.shape[a] for a in axes)
        self.devices = list(mesh.devices.flat)
        batch_spec = axes if axes else None
        self.batch = NamedSharding(mesh, PartitionSpec(batch_spec))
        tensor = mesh.shape.get("tensor", 1)
        heads = "tensor" if tensor > 1 and config.num_key_value_heads % tensor == 0 else None
        kv = NamedSharding(mesh, PartitionSpec(None, batch_spec, heads, None, None))
        rows = NamedSharding(mesh, PartitionSpec(batch_spec, None))
        self.cache = KVCache(kv, kv, rows, rows)
        self.replicated = NamedSharding(mesh, PartitionSpec())

    def params(self, state):
        if self.mesh is None:
            return state
        mesh_devices = set(self.devices)
        if all(getattr(x, "sharding", None) is not None and x.sharding.device_set == mesh_devices
               for x in jax.tree.leaves(state)):
            return state
        return jax.device_put(state, self.replicated)

    def rows(self, array):
        array = np.asarray(array)
        return jnp.asarray(array) if self.mesh is None else jax.device_put(array, self.batch)

    def whole(self, array):
        if self.mesh is None:
            return array if isinstance(array, jax.Array) else jnp.asarray(array)
        return jax.device_put(array, self.replicated)

    def key(self, seed: int):
        if self.mesh is None:
            return jax.random.key(seed)
        # A typed key cannot be device_put onto other processes' devices; create it there instead.
        return jax.jit(lambda: jax.random.key(seed), out_shardings=self.replicated)()

    def host(self, array) -> np.ndarray:
        """A whole output array on the host; rows held by other processes are gathered (a collective:
        every process calls this for the same arrays in the same order)."""
        if isinstance(array, jax.Array) and not array.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(array, tiled=True))
        return np.asarray(array)

    def slot_state(self, slots):
        """Continuous-batching slot state, split over the batch axes like the cache rows."""
        if self.mesh is None:
            return slots
        return jax.jit(lambda s: s, out_shardings=self.batch)(slots)

    def new_cache(self, model, batch: int, length: int):
        if self.mesh is None:
            return model.init_cache(batch, length)
        return jax.jit(lambda: model.init_cache(batch, length), out_shardings=self.cache)()


def generate(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, num_samples: int = 1, stop: Sequence[str] = (), seed: int = 0,
             batch_size: int | None = None, mesh: Mesh | None = None, progress: bool = False,
             ignore_eos: bool = False, engine: str = "static",
             steps_per_refill: int = continuous.DEFAULT_STEPS_PER_REFILL,
             stats: dict | None = None) -> list[list[Completion]]:
    """Generate `num_samples` completions for each prompt; returns one list per prompt, in input order.

    prompts: strings (tokenized as given) or chat message lists (rendered with the tokenizer's chat
    template and the generation prompt). temperature 0 is greedy; top_k 0 and top_p 1 are off.
    Rows stop at any end token of the tokenizer/model (unless ignore_eos) and at stop strings.
    A row's randomness depends only on (seed, prompt index, sample index), not on batching.
    batch_size: rows (prompt x sample) per device batch (default DEFAULT_BATCH_SIZE).
    mesh: split every batch over the mesh's data axes; raises CacheSizeError before allocating when
    a batch cannot fit.
    engine: "static" (batches of length-sorted rows, each run until its longest row ends) or
    "continuous" (batch_size decode slots refilled with waiting rows every `steps_per_refill` steps).
    Both return the same completions (greedy: token for token, up to float rounding near ties).
    stats: if a dict, filled with {"engine", "slot_steps", "live_slot_steps", "occupancy", "device_calls"}.
    """
    if engine not in ENGINES:
        raise ValueError(f"generate: engine {engine!r} is unknown; choose one of {', '.join(ENGINES)}")
    if not isinstance(steps_per_refill, int | np.integer) or steps_per_refill < 1:
        raise ValueError(f"steps_per_refill must be a positive integer, got {steps_per_refill!r}")
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(num_samples, int | np.integer) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if batch_size is not None and (not isinstance(batch_size, int | np.integer) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(stop, str):
        stop = (stop,)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    sampling = SamplingSettings(float(temperature), int(top_k), float(top_p))
    config = model.config
    prompt_ids = render_prompts(tokenizer, prompts)
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(
                f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's "
                f"max_position_embeddings {config.max_position_embeddings}"
            )
    # Greedy samples of one prompt are identical: compute one row and repeat it.
    row_samples = 1 if sampling.greedy else num_samples
    rows = [(p, s) for p in range(len(prompt_ids)) for s in range(row_samples)]
    lengths = [len(prompt_ids[p]) for p, _ in rows]

    place = _Placement(mesh, config)
    ends = end_token_ids(tokenizer, config)
    end_table = np.full(_next_power_of_two(max(len(ends), 4)), -1, np.int32)
    end_table[: len(ends)] = ends
    end_table, stop_table = place.whole(end_table), place.whole(_stop_table(tokenizer, stop))
    base_key = place.key(seed)
    results: list[Completion | None] = [None] * len(rows)
    figures = {"slot_steps": 0, "live_slot_steps": 0, "device_calls": 0}
    if engine == "continuous":
        slots = math.ceil(min(batch_size or DEFAULT_BATCH_SIZE, _next_power_of_two(len(rows))) / place.shards)
        slots *= place.shards
        longest = max(prompt_bucket(n) for n in lengths)
        check_fits(config, batch=slots, prompt_len=longest, max_new_tokens=max_new_tokens, dtype=model.dtype,
                   devices=place.devices)
        with progress_bar(len(rows), "generate", unit="row", enabled=progress) as bar:
            def done(r, ids, code):
                results[r] = _completion(tokenizer, ids, code, stop)
                bar.update(1)

            figures = continuous.run(model, place, prompt_ids, rows, slots=slots, max_new_tokens=max_new_tokens,
                                     sampling=sampling, end_table=end_table, stop_table=stop_table, base_key=base_key,
                                     stop_at_end=not ignore_eos, steps=int(steps_per_refill), on_done=done,
                                     bucket=prompt_bucket)
    else:
        batches = _plan_batches(lengths, batch_size or DEFAULT_BATCH_SIZE, place.shards)
        for shape in sorted({(b.size, b.prompt_len) for b in batches}, reverse=True):
            check_fits(config, batch=shape[0], prompt_len=shape[1], max_new_tokens=max_new_tokens, dtype=model.dtype,
                       devices=place.devices)

        graphdef, state = nnx.split(model)
        state = place.params(state)
        cache, cache_shape, pending = None, None, None

        def collect(batch, tokens, out_lengths, finish):
            tokens, out_lengths, finish = place.host(tokens), place.host(out_lengths), place.host(finish)
            used = out_lengths[: len(batch.rows)]
            # Decode steps only (each row's first token comes from the prefill): every slot of a static batch
            # runs until its longest row ends.
            figures["slot_steps"] += batch.size * (int(used.max()) - 1)
            figures["live_slot_steps"] += int((used - 1).sum())
            figures["device_calls"] += 2
            for j, r in enumerate(batch.rows):
                results[r] = _completion(tokenizer, tokens[j, : out_lengths[j]], int(finish[j]), stop)

        with progress_bar(len(rows), "generate", unit="row", enabled=progress) as bar:
            for batch in batches:
                b, p = batch.size, batch.prompt_len
                input_ids = np.zeros((b, p), np.int32)
                prompt_mask = np.zeros((b, p), bool)
                row_ids = np.zeros((b, 2), np.int32)
                active = np.zeros(b, bool)
                real_lengths = np.ones(b, np.int32)
                for j, r in enumerate(batch.rows):
                    ids = prompt_ids[rows[r][0]]
                    input_ids[j, p - len(ids) :] = ids
                    prompt_mask[j, p - len(ids) :] = True
                    row_ids[j] = rows[r]
                    active[j] = True
                    real_lengths[j] = len(ids)
                prompt_mask[~active, -1] = True  # batch padding: one dummy token, never reported
                positions = np.maximum(np.cumsum(prompt_mask, axis=1, dtype=np.int32) - 1, 0)
                if cache_shape != (b, p):
                    cache = None  # free the old buffer before allocating the new one
                    cache, cache_shape = place.new_cache(model, b, p + max_new_tokens), (b, p)
                first_logits, cache = static_engine.prefill(graphdef, state, cache, place.rows(input_ids),
                                                     place.rows(positions), place.rows(prompt_mask))
                settings = static_engine.DecodeSettings(max_new_tokens, p, sampling, stop_at_end=not ignore_eos)
                tokens, out_lengths, finish, cache = static_engine.decode(
                    graphdef, state, cache, first_logits, place.rows(real_lengths), place.rows(active),
                    base_key, place.rows(row_ids), end_table, stop_table, settings=settings,
                )
                if pending is not None:  # turn the previous batch into text while this one runs
                    collect(*pending)
                    bar.update(len(pending[0].rows))
                pending = (batch, tokens, out_lengths, finish)
            if pending is not None:
                collect(*pending)
                bar.update(len(pending[0].rows))

    if stats is not None:
        stats.update(figures, engine=engine, occupancy=figures["live_slot_steps"] / max(figures["slot_steps"], 1))
    out: list[list[Completion]] = [[] for _ in prompt_ids]
    for (p, _), completion in zip(rows, results, strict=True):
        out[p].append(completion)
    if row_samples != num_samples:
        out = [samples * num_samples for samples in out]
    return out
