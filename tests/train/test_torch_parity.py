"""One AdamW step equals the same step in PyTorch (transformers Llama, torch.optim.AdamW), same init and batch."""

import json

import jax
import numpy as np
import pytest

from tests.train.helpers import tiny_model
from undo_jax.models.weights import export_tensors
from undo_jax.sharding import make_mesh
from undo_jax.train import TrainConfig, train_tokenized
from undo_jax.train.data import TokenizedExample, step_micro_batches

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def torch_step(model, seqs, config):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in export_tensors(model)}, strict=True)
    hf.float().train()
    decay = [p for n, p in hf.named_parameters() if not ("norm" in n or n.endswith("bias"))]
    no_decay = [p for n, p in hf.named_parameters() if "norm" in n or n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
    (batch,) = step_micro_batches(seqs, config)
    ids = torch.from_numpy(batch.tokens).long()
    attention_mask = torch.from_numpy(batch.segment_ids > 0).long()
    logits = hf(input_ids=ids, attention_mask=attention_mask).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch.targets).long().flatten(),
                                            reduction="none")
    mask = torch.from_numpy(batch.loss_mask).flatten()
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), config.clip_norm)
    opt.step()
    return loss.item(), {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def test_one_adamw_step_matches_pytorch(tmp_path):
    model = tiny_model(seed=11)
    rng = np.random.default_rng(5)
    seqs = [TokenizedExample(rng.integers(4, 128, size=n).astype(np.int32), int(rng.integers(1, n - 2)))
            for n in (30, 17, 24, 9)]
    config = TrainConfig(lr=1e-3, epochs=1, batch_size=4, micro_batch=4, max_length=32, packing=False,
                         warmup_ratio=0.0, schedule="constant", weight_decay=0.1, clip_norm=0.5, progress=False)
    expected_loss, expected = torch_step(model, seqs, config)

    log_path = tmp_path / "log.jsonl"
    mesh = make_mesh(devices=jax.devices()[:1])
    train_tokenized(model, seqs, config, mesh=mesh, log_path=log_path)
    (record,) = [json.loads(line) for line in log_path.read_text().splitlines()][1:]
    assert record["grad_norm"] > config.clip_norm  # the clip is exercised
    np.testing.assert_allclose(record["loss"], expected_loss, rtol=1e-5)
    got = dict(export_tensors(model))
    assert set(got) == set(expected)
    for name, want in expected.items():
        rel = np.linalg.norm(got[name] - want) / np.linalg.norm(want)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"
