"""Greedy parity with transformers on the real SmolLM2-135M-Instruct (GGUF), 16 real prompts x 64 tokens."""

from __future__ import annotations

import json
import os

import pytest

from tests.sampling.test_parity import assert_same_tokens, hf_greedy
from undo_jax.models import load_pretrained, load_tokenizer
from undo_jax.sampling import end_token_ids, generate
from undo_jax.sampling.generate import render_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gsm8k_questions(shared_data_optional, questions) -> list[str]:
    if shared_data_optional is None:
        return questions[:16]
    lines = (shared_data_optional / "gsm8k" / "test.jsonl").read_text().splitlines()[:8]
    return [json.loads(line)["question"] for line in lines] + questions[:8]


def test_greedy_matches_transformers_smollm2(smollm2_gguf, gsm8k_questions):
    torch = pytest.importorskip("torch")
    import transformers

    model = load_pretrained(smollm2_gguf, dtype="float32")
    tokenizer = load_tokenizer(smollm2_gguf)
    # transformers dequantizes the GGUF itself: an independent path to the same weights.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    prompts = [[{"role": "user", "content": q}] for q in gsm8k_questions]
    prompt_ids = render_prompts(tokenizer, prompts)
    assert len(prompts) == 16 and len(set(map(len, prompt_ids))) > 8
    ours = generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared, oversubscribed CPU are many times slower
    try:
        reference = hf_greedy(hf_model, prompt_ids, end_token_ids(tokenizer, model.config), 64)
    finally:
        torch.set_num_threads(threads)
    assert sum(len(r) for r in reference) > 16 * 20
    assert_same_tokens(ours, reference)
    assert all(c[0].finish_reason in ("eos", "length") for c in ours)
    assert any(c[0].finish_reason == "eos" for c in ours) and "<|im_end|>" not in ours[0][0].text
