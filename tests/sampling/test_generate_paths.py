"""generate() paths no other test reaches: a tokenizer without a chat template, `stop` as one str and as several
strings; and the jitted `engine.decode` called directly against a step-by-step greedy reference."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from tests.sampling.conftest import tiny_model
from undo_jax.sampling import engine, generate, prompt_bucket
from undo_jax.sampling.sample import SamplingSettings


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=1, std=0.1)


@pytest.fixture(scope="module")
def plain_tokenizer(toy_tokenizer):
    tok = copy.deepcopy(toy_tokenizer)
    tok.chat_template = None
    return tok


_forward = nnx.jit(lambda model, ids: model(ids))


def greedy_reference(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens by full (causal, uncached) forward passes; right padding to one width leaves the
    positions before it unchanged, so one compiled shape serves every step."""
    ids = list(prompt_ids)
    width = 128
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        ids.append(int(np.asarray(_forward(model, buf))[0, len(ids) - 1].argmax()))
    return ids[len(prompt_ids):]


def test_plain_text_prompts_without_a_chat_template(model, plain_tokenizer, questions):
    prompts = questions[:3]
    out = generate(model, plain_tokenizer, prompts, max_new_tokens=6, ignore_eos=True)
    for prompt, (c,) in zip(prompts, out, strict=True):
        ids = plain_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert list(c.token_ids) == greedy_reference(model, ids, 6)  # the raw text, no template around it
    # A message list without a template is rendered as the trainer renders it (undo_jax.chat: the contents joined by
    # newlines, then a newline), so the student is asked exactly what it was trained on.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompts[0]}]
    (chat,) = generate(model, plain_tokenizer, [messages], max_new_tokens=6, ignore_eos=True)[0]
    ids = plain_tokenizer(f"Be brief.\n{prompts[0]}\n", add_special_tokens=False)["input_ids"]
    assert list(chat.token_ids) == greedy_reference(model, ids, 6)


def test_one_stop_string_as_str_and_several_stop_strings(model, toy_tokenizer, questions):
    prompt = questions[2]
    (full,) = generate(model, toy_tokenizer, [prompt], max_new_tokens=16, ignore_eos=True)[0]
    text = full.text
    assert len(text) >= 12, text
    late, early = text[8:11], text[3:6]
    assert text.find(early) < text.find(late)
    (as_str,) = generate(model, toy_tokenizer, [prompt], max_new_tokens=16, ignore_eos=True, stop=late)[0]
    (as_list,) = generate(model, toy_tokenizer, [prompt], max_new_tokens=16, ignore_eos=True, stop=[late])[0]
    assert as_str == as_list  # a str is one stop string, not a set of one-character stops
    assert as_str.finish_reason == "stop" and as_str.text == text[: text.find(late)]
    # Several stops: the text is cut at whichever occurs first, in either order of the list.
    for stops in ([late, early], [early, late], ["never-generated-xyz", early]):
        (cut,) = generate(model, toy_tokenizer, [prompt], max_new_tokens=16, ignore_eos=True, stop=stops)[0]
        assert cut.finish_reason == "stop" and cut.text == text[: text.find(early)], stops
        assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    (none_hit,) = generate(model, toy_tokenizer, [prompt], max_new_tokens=16, ignore_eos=True,
                           stop=["never-generated-xyz", "qqqqzzzz"])[0]
    assert none_hit == full


def _decode_inputs(model, rows: list[list[int]], n: int):
    b = len(rows)
    p = prompt_bucket(max(map(len, rows)))
    input_ids = np.zeros((b, p), np.int32)
    mask = np.zeros((b, p), bool)
    for i, row in enumerate(rows):
        input_ids[i, p - len(row):], mask[i, p - len(row):] = row, True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    graphdef, state = nnx.split(model)
    # The prompt mask marks the real (non-padding) prompt slots; the cache tracks which later slots are filled.
    logits, cache = engine.prefill(graphdef, state, model.init_cache(b, p + n), input_ids, positions, mask)
    lengths = np.asarray([len(r) for r in rows], np.int32)
    row_ids = np.stack([np.arange(b), np.zeros(b)], axis=1).astype(np.int32)
    return graphdef, state, cache, logits, lengths, p, row_ids


def test_engine_decode_greedy_equals_full_forward_and_reports_finish(model, toy_tokenizer, questions):
    rows = [toy_tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions[:3]]
    n = 8
    expected = [greedy_reference(model, r, n) for r in rows]
    none = np.full((4,), -1, np.int32)
    no_stops = np.full((1, 1), -3, np.int32)  # matches no token (generate's unused-row filler)

    def run(end_ids, stop_table, active=(True, True, True)):
        graphdef, state, cache, logits, lengths, p, row_ids = _decode_inputs(model, rows, n)
        settings = engine.DecodeSettings(n, p, SamplingSettings())
        tokens, out_len, finish, _ = engine.decode(graphdef, state, cache, logits, lengths, np.asarray(active),
                                                   jax.random.key(0), row_ids, end_ids, stop_table,
                                                   settings=settings)
        return np.asarray(tokens), np.asarray(out_len), np.asarray(finish)

    tokens, out_len, finish = run(none, no_stops)
    assert tokens.tolist() == expected
    assert out_len.tolist() == [n] * 3 and finish.tolist() == [engine.FINISH_LENGTH] * 3

    # An end id equal to row 0's 3rd token ends row 0 there (length 3 counts the end token); a two-token stop
    # sequence equal to row 1's tokens 4-5 ends row 1 after its 5th token; row 2 runs to the length limit unless
    # one of those tokens occurs in it first.
    end = none.copy()
    end[0] = expected[0][2]
    stop = np.asarray([expected[1][3:5]], np.int32)
    tokens, out_len, finish = run(end, stop)

    def first_finish(seq):
        for i in range(n):
            if seq[i] == end[0]:
                return i + 1, engine.FINISH_END
            if i >= 1 and seq[i - 1:i + 1] == stop[0].tolist():
                return i + 1, engine.FINISH_STOP
        return n, engine.FINISH_LENGTH

    want = [first_finish(seq) for seq in expected]
    assert want[0] == (expected[0].index(end[0]) + 1, engine.FINISH_END)
    assert [(int(a), int(b)) for a, b in zip(out_len, finish, strict=True)] == want
    for row, (length, _) in enumerate(want):
        assert tokens[row, :length].tolist() == expected[row][:length]

    # An inactive row (batch padding) is done from the start: never reported as ended by a token, and the
    # active rows are unaffected by it.
    tokens, out_len, finish = run(end, stop, active=(True, False, True))
    assert finish[1] == engine.FINISH_LENGTH
    assert [(int(out_len[r]), int(finish[r])) for r in (0, 2)] == [want[0], want[2]]
    assert tokens[0, :want[0][0]].tolist() == expected[0][:want[0][0]]
