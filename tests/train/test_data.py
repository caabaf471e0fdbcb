"""Host-side data path: rendering, completion masks, overlong handling, packing, bucketing, step schedule."""

import dataclasses

import numpy as np
import pytest

from tests.train.helpers import tiny_tokenizer
from undo_jax.train import Example, OverlongPromptError, TrainConfig
from undo_jax.train.data import (
    TokenizedExample,
    length_bucket,
    pack_rows,
    render_example,
    row_bucket,
    step_example_indices,
    step_micro_batches,
    steps_per_epoch,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_render_uses_the_chat_template_and_ends_with_end_of_turn(tok):
    prompt_ids, completion_ids = render_example(tok, Example([{"role": "user", "content": "2+2?"}], "4"))
    full = tok.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                   tokenize=False)
    assert prompt_ids + completion_ids == tok(full, add_special_tokens=False)["input_ids"]
    generation_prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                                add_generation_prompt=True)
    assert prompt_ids == tok(generation_prompt, add_special_tokens=False)["input_ids"]
    assert completion_ids[0] == tok.convert_tokens_to_ids("4")
    assert tok.convert_tokens_to_ids("<|im_end|>") in completion_ids
    # A string prompt is one user turn.
    assert render_example(tok, Example("2+2?", "4")) == (prompt_ids, completion_ids)


def test_overlong_prompts_are_skipped_and_counted_or_raise(tok):
    examples = [Example("short", "yes"), Example("x" * 200, "no"), Example("also short", "fine")]
    kept, skipped = tokenize_examples(tok, examples, TrainConfig(max_length=64))
    assert skipped == [1] and len(kept) == 2
    with pytest.raises(OverlongPromptError, match=r"examples\[1\].*max_length=64"):
        tokenize_examples(tok, examples, TrainConfig(max_length=64, skip_overlong=False))


def test_long_completion_is_truncated_but_kept(tok):
    (ex,), skipped = tokenize_examples(tok, [Example("q", "a" * 100)], TrainConfig(max_length=40))
    assert not skipped and len(ex) == 40 and ex.completion_start < 40


def test_bad_examples_raise_clear_errors(tok):
    with pytest.raises(TypeError, match=r"examples\[0\]"):
        tokenize_examples(tok, [("prompt", "completion")], TrainConfig())


def test_buckets():
    assert [length_bucket(n, 1024) for n in (1, 16, 17, 25, 33, 49, 65, 100, 129, 500, 1000, 2000)] == [
        16, 16, 24, 32, 48, 64, 96, 128, 192, 512, 1024, 1024]
    assert length_bucket(700, 640) == 640
    assert [row_bucket(r, 8, 1) for r in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert [row_bucket(r, 16, 8) for r in (1, 8, 9)] == [8, 8, 16]


def _seq(n, start):
    return TokenizedExample(np.arange(1, n + 1, dtype=np.int32), start)


def test_packing_is_first_fit_decreasing_and_keeps_every_example():
    seqs = [_seq(n, 1) for n in (5, 9, 3, 7, 2, 6)]
    rows = pack_rows(seqs, 10)
    assert all(sum(len(s) for s in row) <= 10 for row in rows)
    assert sorted(len(s) for row in rows for s in row) == [2, 3, 5, 6, 7, 9]
    assert len(rows) == 4  # 32 tokens in rows of 10


@pytest.mark.parametrize("packing", [True, False])
def test_micro_batch_arrays_mark_exactly_the_completion_targets(packing):
    seqs = [_seq(6, 2), _seq(4, 3), _seq(9, 1)]
    config = TrainConfig(max_length=16, micro_batch=2, packing=packing)
    batches = step_micro_batches(seqs, config)
    seen = []
    for b in batches:
        assert b.tokens.shape[1] == 16 and b.tokens.shape[0] in (1, 2)
        for r in range(b.shape[0]):
            for seg in range(1, b.segment_ids[r].max() + 1):
                cols = np.flatnonzero(b.segment_ids[r] == seg)
                assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))  # contiguous
                ids = b.tokens[r, cols]
                assert np.array_equal(b.positions[r, cols], np.arange(len(cols)))
                assert np.array_equal(b.targets[r, cols[:-1]], ids[1:])
                seen.append((len(cols), b.loss_mask[r, cols].tolist()))
        assert not b.loss_mask[b.segment_ids == 0].any()
    # Completion starts 2, 3, 1: targets ids[t+1] for t+1 >= start, never the last position.
    expected = {6: [0, 1, 1, 1, 1, 0], 4: [0, 0, 1, 0], 9: [1] * 8 + [0]}
    assert sorted(seen) == sorted((n, [float(x) for x in m]) for n, m in expected.items())
    assert sum(b.loss_mask.sum() for b in batches) == 4 + 1 + 8


def test_micro_batch_must_divide_by_batch_shards():
    with pytest.raises(ValueError, match="micro_batch=6.*data x fsdp = 4"):
        step_micro_batches([_seq(4, 1)], TrainConfig(micro_batch=6), row_multiple=4)


def test_step_schedule_covers_each_epoch_once_and_depends_only_on_the_step():
    config = TrainConfig(batch_size=4, epochs=3, seed=7)
    n = 10
    assert steps_per_epoch(n, 4) == 3
    for epoch in range(3):
        seen = np.concatenate([step_example_indices(n, config, epoch * 3 + i) for i in range(3)])
        assert sorted(seen.tolist()) == list(range(n))
    assert not np.array_equal(step_example_indices(n, config, 0), step_example_indices(n, config, 3))
    # Only (seed, step) decide a step's examples: not the number of epochs, nor the global numpy state, nor
    # which steps were computed before (a resumed run asks for step 4 first).
    fresh = step_example_indices(n, dataclasses.replace(config, epochs=9), 4)
    np.random.seed(123)
    np.random.permutation(n)
    assert np.array_equal(fresh, step_example_indices(n, config, 4))
    assert not np.array_equal(fresh, step_example_indices(n, dataclasses.replace(config, seed=8), 4))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule: must be one of"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        TrainConfig(batch_size=0)
