"""Greedy generation equals transformers' generate(do_sample=False) token for token (fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers

from undo_jax.models import load_pretrained
from undo_jax.sampling import end_token_ids, generate
from undo_jax.sampling.generate import render_prompts

HF_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def hf_greedy(hf_model, prompt_ids: list[list[int]], ends, max_new_tokens: int) -> list[list[int]]:
    """transformers generate on the same left-padded batch; each row cut after its first end token."""
    width = max(map(len, prompt_ids))
    input_ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=list(ends), pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in ends), len(row))
        rows.append(row[:cut])
    return rows


def assert_same_tokens(ours, reference):
    for i, (completions, ref) in enumerate(zip(ours, reference, strict=True)):
        mine = list(completions[0].token_ids)
        first_diff = next((j for j, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), None)
        assert mine == ref, f"prompt {i}: first differing token at {first_diff} (ours {len(mine)}, hf {len(ref)})"


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_greedy_matches_transformers_tiny(model_type, toy_tokenizer, questions, tmp_path):
    config = HF_CONFIGS[model_type](
        vocab_size=len(toy_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=0.1,  # peakier logits than the default: varied greedy outputs, clear argmax margins
        tie_word_embeddings=model_type == "qwen3",
    )
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path))

    prompts = [[{"role": "user", "content": q}] for q in questions[:16]]
    prompt_ids = render_prompts(toy_tokenizer, prompts)
    assert len(set(map(len, prompt_ids))) > 4, "prompts of different lengths exercise the left padding"
    ours = generate(model, toy_tokenizer, prompts, max_new_tokens=64, batch_size=16)
    reference = hf_greedy(hf_model, prompt_ids, end_token_ids(toy_tokenizer, model.config), 64)
    assert len({t for row in reference for t in row}) > 30, "degenerate reference output proves little"
    assert_same_tokens(ours, reference)


def test_gemma3_greedy_matches_transformers_past_the_window(toy_tokenizer, questions, tmp_path):
    """Gemma 3 with a window of 8: prompts and 40 new tokens run far past it, in both engines."""
    config = transformers.Gemma3TextConfig(
        vocab_size=len(toy_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False,  # a tiny random tied Gemma only echoes one token; the tied head is in tests/models
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    )
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm scales 1 + w with w != 0; larger weights than the init: varied outputs
        for p in hf_model.parameters():
            p.normal_(0.0, 0.1)
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path))

    prompts = [[{"role": "user", "content": q}] for q in questions[:8]]
    prompt_ids = render_prompts(toy_tokenizer, prompts)
    assert min(map(len, prompt_ids)) > 8 and len(set(map(len, prompt_ids))) > 4
    reference = hf_greedy(hf_model, prompt_ids, end_token_ids(toy_tokenizer, model.config), 40)
    assert len({t for row in reference for t in row}) > 30, "degenerate reference output proves little"
    assert_same_tokens(generate(model, toy_tokenizer, prompts, max_new_tokens=40, batch_size=8), reference)
    continuous = generate(model, toy_tokenizer, prompts, max_new_tokens=40, batch_size=4, engine="continuous")
    assert_same_tokens(continuous, reference)
