"""Fixtures of the sampler tests: a small byte-level BPE tokenizer with a ChatML template, tiny models."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from undo_jax.models import CausalLM, ModelConfig

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Short hand-written questions of different lengths (the shared data is used when present).
QUESTIONS = [
    "What is 2 + 3?",
    "Tom has 5 apples and eats 2. How many are left?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "If a shirt costs 20 dollars and is on sale for 25 percent off, what is the sale price?",
    "Sara had 12 pencils. She gave 4 to Ben and bought 7 more. How many pencils does she have now?",
    "What is 9 times 7?",
    "There are 24 students in a class, split equally into 4 groups. How many are in each group?",
    "Mike saves 15 dollars every week. How much has he saved after 8 weeks?",
]


def make_tokenizer(corpus: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def questions(shared_data_optional) -> list[str]:
    """16+ real SVAMP questions when the shared data is there, else the hand-written ones."""
    if shared_data_optional is None:
        return QUESTIONS * 2
    lines = (shared_data_optional / "svamp" / "svamp.jsonl").read_text().splitlines()[:24]
    return [f"{r['Body']} {r['Question']}" for r in map(json.loads, lines)]


@pytest.fixture(scope="session")
def shared_data_optional(request):
    try:
        return request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="session")
def toy_tokenizer(questions):
    return make_tokenizer(questions + QUESTIONS)


def tiny_config(model_type: str = "qwen2", vocab_size: int = 400, **overrides) -> ModelConfig:
    base = dict(model_type=model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
                tie_word_embeddings=model_type != "llama", max_position_embeddings=512)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(model_type: str = "qwen2", seed: int = 0, *, std: float = 0.02, **overrides) -> CausalLM:
    """Random tiny model: norms at one, every other weight (biases included) N(0, std) from numpy.

    Filled from numpy instead of the model's own initialiser, which spends seconds compiling one
    random kernel per parameter shape on a busy 2-core machine.
    """
    config = tiny_config(model_type, **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names[-2:] == ["weight", "value"]:  # RMSNorm scales
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))
