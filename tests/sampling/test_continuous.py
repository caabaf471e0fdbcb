"""Continuous batching (generate(engine="continuous")) against the static engine, on tiny random models."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tests.sampling.conftest import tiny_model
from undo_jax.sampling import generate


@pytest.fixture(scope="module")
def model():
    # std 0.3: peaked enough that some rows hit an end token after a few tokens and others run to the limit.
    return tiny_model("qwen2", seed=2, std=0.3)


@pytest.fixture(scope="module")
def chats(questions):
    return [[{"role": "user", "content": q}] for q in questions[:16]]


def _ids(out):
    return [[s.token_ids for s in samples] for samples in out]


def test_greedy_equals_static_with_more_prompts_than_slots(model, toy_tokenizer, chats):
    static_stats, cont_stats = {}, {}
    static = generate(model, toy_tokenizer, chats, max_new_tokens=40, batch_size=4, stats=static_stats)
    cont = generate(model, toy_tokenizer, chats, max_new_tokens=40, batch_size=4, engine="continuous",
                    steps_per_refill=4, stats=cont_stats)
    lengths = [len(c[0].token_ids) for c in static]
    # rows of very different lengths, some ending at their first token
    assert min(lengths) == 1 and len(set(lengths)) >= 4 and max(lengths) == 40, lengths
    assert _ids(cont) == _ids(static)
    assert [c[0].text for c in cont] == [c[0].text for c in static]
    assert [c[0].finish_reason for c in cont] == [c[0].finish_reason for c in static]
    # The same useful decode steps, in fewer slot-steps: finished slots were refilled.
    assert cont_stats["live_slot_steps"] == static_stats["live_slot_steps"] == sum(n - 1 for n in lengths)
    assert cont_stats["slot_steps"] < static_stats["slot_steps"]
    assert cont_stats["occupancy"] > static_stats["occupancy"]


@pytest.mark.parametrize("steps_per_refill", [1, 7])
def test_refill_interval_does_not_change_outputs(model, toy_tokenizer, chats, steps_per_refill):
    ref = generate(model, toy_tokenizer, chats[:9], max_new_tokens=24, batch_size=4)
    out = generate(model, toy_tokenizer, chats[:9], max_new_tokens=24, batch_size=4, engine="continuous",
                   steps_per_refill=steps_per_refill)
    assert _ids(out) == _ids(ref)


def test_sampled_rows_do_not_depend_on_slot_count_or_run(model, toy_tokenizer, chats):
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, num_samples=3, seed=11, engine="continuous")
    four = generate(model, toy_tokenizer, chats[:7], batch_size=4, **kw)
    sixteen = generate(model, toy_tokenizer, chats[:7], batch_size=16, **kw)
    again = generate(model, toy_tokenizer, chats[:7], batch_size=4, **kw)
    assert _ids(four) == _ids(sixteen) == _ids(again)
    assert any(len(set(samples)) > 1 for samples in _ids(four)), "the samples of a prompt differ"
    # ... and equal the static engine's: a row's key depends on (seed, prompt, sample, token index) only.
    static = generate(model, toy_tokenizer, chats[:7], batch_size=8, **dict(kw, engine="static"))
    assert _ids(four) == _ids(static)


def test_stop_strings_match_static(model, toy_tokenizer, chats):
    full = generate(model, toy_tokenizer, chats[:6], max_new_tokens=30, temperature=1.0, seed=2)
    text = next(c[0].text for c in full if len(c[0].text) > 14)
    stop = [text[8:12], "zzz"]
    kw = dict(max_new_tokens=30, temperature=1.0, seed=2, stop=stop, batch_size=2)
    static = generate(model, toy_tokenizer, chats[:6], **kw)
    cont = generate(model, toy_tokenizer, chats[:6], engine="continuous", **kw)
    assert [(c[0].text, c[0].token_ids, c[0].finish_reason) for c in cont] == \
        [(c[0].text, c[0].token_ids, c[0].finish_reason) for c in static]
    assert any(c[0].finish_reason == "stop" for c in cont)


def test_mesh_of_eight_devices_equals_one_device(model, toy_tokenizer, chats):
    assert len(jax.devices()) == 8
    from undo_jax.sharding import shard_model

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 1, 2), ("data", "fsdp", "tensor"))
    sharded = shard_model(tiny_model("qwen2", seed=2, std=0.3), mesh)
    single = generate(model, toy_tokenizer, chats[:10], max_new_tokens=24, batch_size=4, engine="continuous")
    on_mesh = generate(sharded, toy_tokenizer, chats[:10], max_new_tokens=24, batch_size=4, engine="continuous",
                       mesh=mesh)
    assert _ids(on_mesh) == _ids(single)
    kw = dict(max_new_tokens=16, temperature=1.0, num_samples=2, seed=5, engine="continuous", batch_size=8)
    assert _ids(generate(sharded, toy_tokenizer, chats[:5], mesh=mesh, **kw)) == \
        _ids(generate(model, toy_tokenizer, chats[:5], **kw))


@pytest.mark.parametrize("kwargs,match", [
    (dict(engine="paged"), "engine 'paged' is unknown"),
    (dict(engine="continuous", steps_per_refill=0), "steps_per_refill must be a positive integer"),
])
def test_bad_engine_arguments_are_one_line_errors(model, toy_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        generate(model, toy_tokenizer, ["hi"], max_new_tokens=4, **kwargs)
    assert "\n" not in str(info.value)


def test_prompt_longer_than_the_cache_allows_names_the_prompt(toy_tokenizer):
    small = tiny_model("qwen2", max_position_embeddings=24)
    prompts = ["short", "a much longer prompt " * 3]
    with pytest.raises(ValueError, match=r"prompts\[1\]: \d+ prompt tokens \+ max_new_tokens 8 exceed"):
        generate(small, toy_tokenizer, prompts, max_new_tokens=8, engine="continuous")
