"""Fixtures of the loop tests: a tiny random student (byte-level BPE tokenizer with a ChatML template),
saved as a Hugging Face directory, a small SVAMP-style data file cut from the packaged demo set, and one
finished two-iteration UNDO run (scripted teacher) that the loop tests read or copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO = Path(__file__).resolve().parents[2] / "undo_jax" / "data" / "demo_arith.jsonl"


def demo_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in DEMO.read_text().splitlines()[:n]]


def write_tiny_student(out_dir: Path, corpus: list[str], seed: int = 0) -> Path:
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from undo_jax.models import CausalLM, ModelConfig, save_pretrained

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    config = ModelConfig(model_type="llama", vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         tie_word_embeddings=True, max_position_embeddings=1024, eos_token_id=eos,
                         bos_token_id=None, pad_token_id=fast.pad_token_id)
    model = CausalLM(config, rngs=nnx.Rngs(seed))
    save_pretrained(model, out_dir, tokenizer=fast)
    return out_dir


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    rows = demo_rows(420)
    corpus = [f"{r['Body']} {r['Question']}" for r in rows]
    corpus += ["Let's compute step by step.", "The answer is 12.", "Solve the problem step by step."]
    return write_tiny_student(tmp_path_factory.mktemp("student") / "tiny", corpus)


def tiny_config(run_dir: Path, student: Path, **overrides):
    from undo_jax.config import run_config

    base = dict(run_dir=str(run_dir), student=str(student), data_source="demo", val_size=8, train_size=24,
                test_size=16, epochs_first=2, epochs_later=1, lr=1e-3, warmup_ratio=0.0, batch_size=8, micro_batch=8,
                max_length=256, max_new_tokens=12, eval_batch_size=16, eval_chunk=8, max_iterations=2,
                diagnosis_examples=5, rewrite_examples=2, teacher="reference")
    base.update(overrides)
    return run_config(**base)


def number(row_id: str) -> int:
    return int(row_id.split("-")[-1])


@pytest.fixture(scope="session")
def undo_run(tmp_path_factory, tiny_student):
    """(run dir, the scripted teacher, final state) of a finished 2-iteration run; tests copy it before changing it."""
    from tests.undo.scripted_teacher import ScriptedTeacher
    from undo_jax.undo import run

    run_dir = tmp_path_factory.mktemp("e2e") / "undo"
    teacher = ScriptedTeacher(cache_path=str(run_dir.parent / "cache.sqlite"))
    state = run(tiny_config(run_dir, tiny_student), teacher=teacher)
    return run_dir, teacher, state
