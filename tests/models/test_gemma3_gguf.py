"""The real Gemma 3 270M (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K, Q8_0 tensors) in undo_jax vs transformers' own GGUF loader.

Both sides dequantize the same file to float32 (and turn llama.cpp's stored 1 + w norm scales back into w), so
differences come from the forward pass only. The prompts are real SVAMP / GSM8K questions in Gemma's turn format
(this base model's GGUF carries no chat template). Tokenizer equality on these texts is
tests/models/test_gguf_tokenizer.py::test_gemma3_tokenizer_matches_transformers.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.models.reference import real_questions
from undo_jax.models import load_pretrained, load_tokenizer, save_pretrained

pytestmark = pytest.mark.slow

N_PER_TASK = 5
BATCH = 5  # two batches: transformers' eager forward over a 262k vocabulary dominates


def _prompts(shared_data) -> list[str]:
    return [f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"
            for q in real_questions(shared_data, N_PER_TASK)]


def _batches(rows: list[list[int]], pad: int):
    """Left-padded batches of BATCH rows of similar length (little padding: the forward passes dominate)."""
    rows = sorted(rows, key=len)
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        width = max(map(len, chunk))
        ids = np.full((len(chunk), width), pad, np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        yield ids, mask


@pytest.fixture
def parse_once(monkeypatch):
    """One GGUFReader per file for every caller (transformers parses the file once for its config and again for
    its weights; ~20 s each for this vocabulary). Same class, same file, read-only use: only the time changes."""
    import gguf

    real, parsed = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = os.path.realpath(path)
        if key not in parsed:
            parsed[key] = real(path, *args, **kwargs)
        return parsed[key]

    monkeypatch.setattr(gguf, "GGUFReader", shared)


def test_gemma3_270m_matches_transformers_gguf_loader(gemma3_gguf, shared_data, tmp_path, parse_once):
    folder, name = os.path.split(gemma3_gguf)
    ours = load_pretrained(gemma3_gguf)
    c = ours.config
    assert (c.model_type, c.vocab_size, c.num_hidden_layers, c.sliding_window) == ("gemma3_text", 262144, 18, 512)
    assert c.local_layers.count(False) == 3  # every sixth layer global
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(gemma3_gguf)
    rows = [tokenizer(p)["input_ids"] for p in _prompts(shared_data)]
    assert all(r[0] == tokenizer.bos_token_id for r in rows)

    positions = agree = 0
    max_diff = 0.0
    reference = []
    for ids, mask in _batches(rows, tokenizer.pad_token_id):
        valid = mask.astype(bool)
        with torch.no_grad():
            ref = theirs(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()[valid]
        got = np.asarray(ours(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, jnp.int32)))[valid]
        positions += len(ref)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        reference.append((ids, mask, ref))
    print(f"gemma3-270m GGUF vs transformers: {positions} positions, top-1 agreement {agree / positions:.4f}, "
          f"max |logit diff| {max_diff:.3g}")
    assert positions >= 500
    assert agree / positions >= 0.99
    assert max_diff <= 1e-2  # fp32 on both sides; the logits themselves reach ~50

    # Export -> transformers' own Gemma3ForCausalLM loads our safetensors: the GGUF loader's tensors exactly (norms
    # as w), so the same logits.
    out = save_pretrained(ours, tmp_path / "export")
    del ours
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "Gemma3ForCausalLM"
    expected = theirs.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ids, mask, ref = reference[0]  # the batch of shortest rows
    with torch.no_grad():
        logits = exported(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_array_equal(logits[mask.astype(bool)], ref)
