"""It learns: SmolLM2-135M-Instruct (GGUF weights) overfits 32 SVAMP examples to a completion loss < 0.1."""

import json

import jax
import pytest

from undo_jax.sharding import make_mesh
from undo_jax.train import Example, TrainConfig, completion_loss, train


def svamp_examples(shared_data, n=32):
    path = shared_data / "svamp" / "svamp.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    records = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    examples = []
    for r in records:
        answer = f"{r['Answer']:g}"
        examples.append(Example(f"{r['Body']} {r['Question']}", f"{r['Equation'].strip()} = {answer}. "
                                                                 f"The answer is {answer}."))
    return examples


@pytest.mark.slow
def test_smollm2_overfits_32_svamp_examples(smollm2_gguf, shared_data, tmp_path):
    from undo_jax.models import load_pretrained, load_tokenizer

    model = load_pretrained(smollm2_gguf)
    tokenizer = load_tokenizer(smollm2_gguf)
    examples = svamp_examples(shared_data)
    # A high lr (cosine-decayed so the last epoch settles) and short rows keep this to minutes on 2 CPU cores.
    config = TrainConfig(lr=5e-4, epochs=8, batch_size=8, micro_batch=8, max_length=128, warmup_ratio=0.0,
                         schedule="cosine", clip_norm=1.0, progress=False)
    log_path = tmp_path / "log.jsonl"
    train(model, tokenizer, examples, config, mesh=make_mesh(devices=jax.devices()[:1]), log_path=log_path)
    header, *records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert header["examples"] == 32 and header["skipped_overlong"] == 0
    losses = [r["loss"] for r in records]
    final = completion_loss(model, tokenizer, examples, config, mesh=make_mesh(devices=jax.devices()[:1]))
    print("losses per step:", [round(x, 4) for x in losses], "final loss on all 32:", final)
    assert losses[0] > 0.5
    assert final["loss"] < 0.1 and final["examples"] == 32
