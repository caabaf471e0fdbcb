"""generate(): batching, ordering, stops, determinism, sharding, memory check, input errors."""

from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tests.sampling.conftest import tiny_model
from undo_jax.sampling import CacheSizeError, end_token_ids, engine, generate, kv_cache_bytes, prompt_bucket
from undo_jax.sampling.generate import _plan_batches, render_prompts


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=1, std=0.1)


@pytest.fixture(scope="module")
def chats(questions):
    return [[{"role": "user", "content": q}] for q in questions[:12]]


def test_returns_one_list_per_prompt_in_input_order(model, toy_tokenizer, chats):
    whole = generate(model, toy_tokenizer, chats, max_new_tokens=12)
    # Batches of 4 rows: several buckets, padded last batch, a different sort -> same results in input order.
    small = generate(model, toy_tokenizer, chats, max_new_tokens=12, batch_size=4, progress=True)
    assert len(whole) == len(chats) and all(len(c) == 1 for c in whole)
    assert [c[0].token_ids for c in small] == [c[0].token_ids for c in whole]
    single = generate(model, toy_tokenizer, chats[1:2], max_new_tokens=12)
    assert single[0][0].token_ids == whole[1][0].token_ids
    for (c,) in whole:
        assert c.finish_reason in ("eos", "stop", "length")
        assert c.text == toy_tokenizer.decode(list(c.token_ids[: len(c.token_ids) - (c.finish_reason == "eos")]))


def test_prefill_logits_equal_full_forward(model, toy_tokenizer, chats):
    from flax import nnx

    ids = render_prompts(toy_tokenizer, chats[:4])
    p = prompt_bucket(max(map(len, ids)))
    input_ids = np.zeros((4, p), np.int32)
    mask = np.zeros((4, p), bool)
    for i, row in enumerate(ids):
        input_ids[i, p - len(row) :], mask[i, p - len(row) :] = row, True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    graphdef, state = nnx.split(model)
    logits, _ = engine.prefill(graphdef, state, model.init_cache(4, p + 8), input_ids, positions, mask)
    reference = model(input_ids, attention_mask=mask)[:, -1]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_greedy_num_samples_repeats_and_eos_stops(model, toy_tokenizer, chats):
    base = generate(model, toy_tokenizer, chats[:4], max_new_tokens=12, num_samples=2)
    assert all(len(c) == 2 and c[0] == c[1] for c in base)
    first = next(c[0] for c in base if c[0].finish_reason == "length" and len(set(c[0].token_ids[:5])) > 2)
    prompt = chats[[c[0] for c in base].index(first)]
    # Make the 6th generated token an end token (the tokenizer's eos); the row must stop at its first use.
    eos = first.token_ids[5]
    cut = first.token_ids.index(eos)
    tokenizer = copy.deepcopy(toy_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    assert eos in end_token_ids(tokenizer)
    (stopped,) = generate(model, tokenizer, [prompt], max_new_tokens=12)[0]
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == first.token_ids[: cut + 1]
    assert stopped.text == toy_tokenizer.decode(list(first.token_ids[:cut]))
    ignored = generate(model, tokenizer, [prompt], max_new_tokens=12, ignore_eos=True)[0][0]
    assert ignored.token_ids == first.token_ids and ignored.finish_reason == "length"


def test_end_tokens_of_tokenizer_and_config(model, toy_tokenizer):
    vocab = toy_tokenizer.get_vocab()
    ends = end_token_ids(toy_tokenizer)
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= set(ends)
    assert vocab["<|im_start|>"] not in ends
    config = dataclasses.replace(model.config, eos_token_id=[7, 9])
    assert set(end_token_ids(toy_tokenizer, config)) == set(ends) | {7, 9}


def test_stop_strings(model, toy_tokenizer, chats):
    full = generate(model, toy_tokenizer, chats[:4], max_new_tokens=12, temperature=1.0, seed=3)
    text = full[0][0].text
    assert len(text) > 12
    stop = text[6:10]
    stopped = generate(model, toy_tokenizer, chats[:4], max_new_tokens=12, temperature=1.0, seed=3, stop=[stop])
    first = stopped[0][0]
    assert first.finish_reason == "stop"
    assert first.text == text[: text.index(stop)]
    decoded = toy_tokenizer.decode(list(first.token_ids))
    assert stop in decoded and stop not in toy_tokenizer.decode(list(first.token_ids[:-1]))
    for before, after in zip(full, stopped, strict=True):  # rows are independent of each other
        b, a = before[0], after[0]
        assert a.text == (b.text[: b.text.index(stop)] if stop in b.text else b.text)
        assert b.token_ids[: len(a.token_ids)] == a.token_ids


def test_same_seed_same_output_other_seed_differs(model, toy_tokenizer, chats):
    kw = dict(max_new_tokens=12, temperature=1.0, num_samples=3)
    a = generate(model, toy_tokenizer, chats[:5], seed=7, **kw)
    b = generate(model, toy_tokenizer, chats[:5], seed=7, batch_size=4, **kw)
    c = generate(model, toy_tokenizer, chats[:5], seed=8, **kw)
    ids = lambda out: [[s.token_ids for s in samples] for samples in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert any(len({s.token_ids for s in samples}) > 1 for samples in a), "samples of one prompt differ"


def test_sharded_generation_equals_single_device(model, toy_tokenizer, chats):
    from undo_jax.sharding import shard_model

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    sharded_model = shard_model(tiny_model("qwen2", seed=1, std=0.1), mesh)  # the same weights as `model`
    # Really laid out over the mesh (not replicated), so the comparison below covers sharded parameters.
    embed = sharded_model.embed_tokens[...]
    assert len(embed.sharding.device_set) == 8 and not embed.sharding.is_fully_replicated
    single = generate(model, toy_tokenizer, chats, max_new_tokens=12)
    sharded = generate(sharded_model, toy_tokenizer, chats, max_new_tokens=12, mesh=mesh)
    assert [c[0].token_ids for c in sharded] == [c[0].token_ids for c in single]
    kw = dict(max_new_tokens=12, temperature=1.0, num_samples=2, seed=5)
    sampled_single = generate(model, toy_tokenizer, chats[:5], **kw)
    sampled_sharded = generate(sharded_model, toy_tokenizer, chats[:5], mesh=mesh, **kw)
    assert [[s.token_ids for s in c] for c in sampled_sharded] == [[s.token_ids for s in c] for c in sampled_single]


def test_batch_that_cannot_fit_fails_before_allocating(toy_tokenizer):
    model = tiny_model("qwen2", max_position_embeddings=1 << 40)
    with pytest.raises(CacheSizeError, match="lower batch_size or max_new_tokens"):
        generate(model, toy_tokenizer, ["hello"] * 64, max_new_tokens=1 << 30)


def test_kv_cache_formula(model):
    cache = model.init_cache(3, 40)
    actual = cache.k.nbytes + cache.v.nbytes
    assert kv_cache_bytes(model.config, 3, 40, model.dtype) == actual


def test_buckets_are_few_and_cover():
    buckets = {prompt_bucket(n) for n in range(1, 2049)}
    assert len(buckets) <= 16
    for n in range(1, 2049):
        assert n <= prompt_bucket(n) <= max(16, int(1.5 * n) + 1)
    plan = _plan_batches([5, 40, 17, 33, 100, 3, 64, 2], batch_size=3, shards=1)
    assert [b.size for b in plan] == [3, 3, 3]
    assert [b.prompt_len for b in plan] == [128, 48, 16]
    assert sorted(r for b in plan for r in b.rows) == list(range(8))
    assert _plan_batches([4, 4, 4], batch_size=32, shards=8)[0].size == 8


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ("a string", {}, TypeError, "list of strings"),
        ([{"role": "user", "content": "hi"}], {}, TypeError, r"prompts\[0\]"),
        (["hi"], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        (["hi"], {"top_p": 0.0}, ValueError, "top_p"),
        (["hi"], {"temperature": -1.0}, ValueError, "temperature"),
        (["hi"], {"stop": [""]}, ValueError, "stop"),
        ([""], {}, ValueError, r"prompts\[0\] tokenizes to no tokens"),
        (["hi " * 600], {}, ValueError, "max_position_embeddings"),
    ],
)
def test_bad_input_is_a_clear_error(model, toy_tokenizer, prompts, kwargs, error, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(model, toy_tokenizer, prompts, **kwargs)
