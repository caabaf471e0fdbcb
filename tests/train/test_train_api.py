"""`train()` end to end with a real (tiny) chat tokenizer: learning, bad input, callbacks, bf16 compute."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from tests.train.helpers import tiny_model, tiny_tokenizer
from undo_jax.sharding import make_mesh
from undo_jax.train import Example, OverlongPromptError, TrainConfig, completion_loss, train

EXAMPLES = [Example(f"{a}+{b}=?", f"{a + b}") for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_learns_and_logs_every_step(tok, tmp_path):
    config = TrainConfig(lr=1e-2, epochs=4, batch_size=8, micro_batch=8, max_length=48, warmup_ratio=0.1,
                         progress=False)
    epochs_seen = []
    log_path = tmp_path / "log.jsonl"
    # One example's prompt alone exceeds max_length: skipped and counted.
    model = train(tiny_model(seed=0), tok, [Example("x" * 100, "y"), *EXAMPLES], config, mesh=one_device(),
                  log_path=log_path,
                  epoch_end_callback=lambda epoch, m: epochs_seen.append((epoch, type(m).__name__)))
    header, *records = read_log(log_path)
    assert header["examples"] == 16 and header["steps"] == 8 and header["skipped_overlong"] == 1
    assert [r["step"] for r in records] == list(range(1, 9))
    assert epochs_seen == [(1, "CausalLM"), (2, "CausalLM"), (3, "CausalLM"), (4, "CausalLM")]
    for r in records:
        assert {"loss", "tokens", "tokens_per_s", "lr", "grad_norm"} <= r.keys()
        assert r["completion_tokens"] < r["tokens"] <= r["padded_tokens"]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < lrs[1]  # 1 warmup step, then cosine decay
    assert np.isfinite(np.asarray(model.lm_head[...])).all()
    # Scoring without updates: the same loss packed or padded, lower than where training started.
    packed = completion_loss(model, tok, EXAMPLES, config, mesh=one_device())
    padded = completion_loss(model, tok, EXAMPLES, dataclasses.replace(config, packing=False, batch_size=5),
                             mesh=one_device())
    assert packed["examples"] == 16 and packed["completion_tokens"] == padded["completion_tokens"]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert packed["loss"] < records[0]["loss"]


def _one_step(tok, tmp_path, name, **overrides):
    """(logged first step, model after it) of one optimizer step on all 16 examples from the same seed-0 model."""
    config = TrainConfig(lr=1e-2, epochs=1, batch_size=16, micro_batch=16, max_length=48, progress=False,
                         **overrides)
    model = tiny_model(seed=0)
    train(model, tok, EXAMPLES, config, mesh=one_device(), log_path=tmp_path / f"{name}.jsonl")
    (record,) = read_log(tmp_path / f"{name}.jsonl")[1:]
    return record, model


def test_remat_chunked_loss_and_bf16_compute_agree_with_the_plain_fp32_step(tok, tmp_path):
    plain, plain_model = _one_step(tok, tmp_path, "plain", loss_chunk=0)
    # Remat and a chunked loss (64 tokens per chunk: several chunks, the last one partial) change only memory:
    # the same loss, gradient and update as the plain step, up to float32 summation order.
    chunked, chunked_model = _one_step(tok, tmp_path, "chunked", remat=True, loss_chunk=64)
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert chunked["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    assert chunked["completion_tokens"] == plain["completion_tokens"]
    np.testing.assert_allclose(np.asarray(chunked_model.lm_head[...]), np.asarray(plain_model.lm_head[...]),
                               rtol=1e-5, atol=1e-7)
    # bf16 compute: the same step to bf16 precision (~3 significant digits), float32 params kept.
    bf16, bf16_model = _one_step(tok, tmp_path, "bf16", compute_dtype="bfloat16", remat=True, loss_chunk=64)
    assert bf16["loss"] == pytest.approx(plain["loss"], rel=1e-2)
    assert bf16["grad_norm"] == pytest.approx(plain["grad_norm"], rel=5e-2)
    assert bf16_model.lm_head[...].dtype == np.float32
    assert bf16_model.dtype == np.float32  # the caller's model keeps its compute dtype
    initial = np.asarray(tiny_model(seed=0).lm_head[...])
    moved = np.asarray(bf16_model.lm_head[...]) - initial
    expected = np.asarray(plain_model.lm_head[...]) - initial
    assert np.abs(moved).max() > 0 and np.corrcoef(moved.ravel(), expected.ravel())[0, 1] > 0.99


def test_bad_input_is_a_clear_error(tok):
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="dataset is empty"):
        train(model, tok, [], TrainConfig(), mesh=one_device())
    overlong = [Example("x" * 100, "y")]
    with pytest.raises(ValueError, match="all 1 examples were skipped"):
        train(model, tok, overlong, TrainConfig(max_length=32), mesh=one_device())
    with pytest.raises(OverlongPromptError, match=r"examples\[0\] prompt is \d+ tokens"):
        train(model, tok, overlong + EXAMPLES, TrainConfig(max_length=32, skip_overlong=False), mesh=one_device())
    with pytest.raises(ValueError, match="micro_batch=3 is not a multiple"):
        train(model, tok, EXAMPLES, TrainConfig(micro_batch=3), mesh=make_mesh(data=2, fsdp=-1))
