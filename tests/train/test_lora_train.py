"""Training a LoRA / QLoRA student: the step equals peft + torch AdamW, only adapters change (on a mesh),
checkpoints hold adapters and the base's fingerprint, and a killed run resumes bit-identical."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model
from tests.train.test_resume import (
    CONFIG,
    KILLED_RUN,
    REPO_ROOT,
    assert_bit_identical,
    flat_params,
    make_seqs,
    one_device,
)
from undo_jax.models import lora
from undo_jax.models.lora import LoRASettings, apply_lora
from undo_jax.models.peft_io import adapter_tensors
from undo_jax.sharding import make_mesh
from undo_jax.train import CheckpointMismatchError, TrainConfig, restore_model, train_tokenized
from undo_jax.train.step import make_optimizer, make_step_functions
from undo_jax.train.trainer import functional_view

RANK, ALPHA = 4, 8.0


def lora_student(seed=9, base_dtype="nf4", targets=tuple(lora.TARGETS)):
    return apply_lora(tiny_model(seed=seed), LoRASettings(RANK, ALPHA, targets, base_dtype), seed=2)


def all_state(model):
    """Every array of the model (params, adapters and quantised storage), by path, on the host."""
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.state(model).to_pure_dict()))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_one_step_equals_peft_and_torch_adamw(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from undo_jax.models import save_pretrained

    base = tiny_model(seed=3)
    save_pretrained(base, tmp_path / "base")
    model = apply_lora(base, LoRASettings(RANK, ALPHA, base_dtype="float32"), seed=1)
    for i, (group_name, proj, _) in enumerate(lora.TARGETS.values()):  # B = 0 would leave A without gradient
        adapter = getattr(model.layers, group_name)[proj + lora.ADAPTER_SUFFIX]
        adapter.b[...] = 0.05 * jax.random.normal(jax.random.key(i), adapter.b[...].shape)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=[p for _, p, _ in lora.TARGETS.values()]))
    peft.set_peft_model_state_dict(pm, {k: torch.tensor(v) for k, v in adapter_tensors(model).items()})

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=(2, 10)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    mask = np.zeros((2, 10), bool)
    mask[0, 3:9], mask[1, 5:9] = True, True
    batch = {"tokens": ids, "targets": targets, "loss_mask": mask, "segment_ids": np.ones((2, 10), np.int32),
             "positions": np.tile(np.arange(10, dtype=np.int32), (2, 1))}
    config = TrainConfig(lr=1e-2, schedule="constant", warmup_ratio=0.0, clip_norm=0.0, weight_decay=0.1,
                         adam_b1=0.9, adam_b2=0.99, adam_eps=1e-8, progress=False)

    graphdef, params, frozen, _, _ = functional_view(model, "float32", one_device())
    tx = make_optimizer(config, 10)
    first_grads, _, _, single_step = make_step_functions(graphdef, tx, lambda s: config.lr, config)
    acc = jax.jit(first_grads)(params, batch, frozen)
    grads = jax.tree.map(lambda g: g / acc["count"], acc["grads"])
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(single_step)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))

    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                            weight_decay=config.weight_decay)
    t_mask = torch.tensor(mask, dtype=torch.float32)
    torch_losses, torch_grads = [], None
    for i in range(2):
        logp = torch.log_softmax(pm(torch.tensor(ids, dtype=torch.long)).logits, dim=-1)
        nll = -logp.gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
        loss = (nll * t_mask).sum() / t_mask.sum()
        opt.zero_grad()
        loss.backward()
        if i == 0:
            torch_grads = {n.replace(".default", ""): p.grad.numpy().copy() for n, p in pm.named_parameters()
                           if p.requires_grad}
        opt.step()
        torch_losses.append(loss.item())

    def peft_named(tree):
        view = nnx.merge(*nnx.split(model))
        nnx.update(view, tree)
        return adapter_tensors(view)

    np.testing.assert_allclose(losses, torch_losses, rtol=1e-5)
    ours_grads = peft_named(grads)
    assert ours_grads.keys() == torch_grads.keys() and len(ours_grads) == 2 * 7 * 2
    for name, g in torch_grads.items():
        assert np.abs(g).max() > 0, name
        assert np.abs(ours_grads[name] - g).max() <= 1e-5 * np.abs(g).max(), name
    ours_after = peft_named(state["params"])
    torch_after = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert ours_after.keys() == torch_after.keys()
    for name, w in torch_after.items():
        assert np.abs(ours_after[name] - w).max() <= 1e-5 * np.abs(w).max(), name


def test_only_adapters_change_on_a_mesh(tmp_path):
    model = lora_student(base_dtype="int8")
    before = all_state(model)
    mesh = make_mesh(fsdp=-1)
    config = dataclasses.replace(CONFIG, epochs=1, batch_size=8, micro_batch=8, save_epoch_params=False)
    model = train_tokenized(model, make_seqs(count=16), config, mesh=mesh, checkpoint_dir=tmp_path / "ckpt",
                            base_source="tiny-llama-seed-9")
    after = all_state(model)
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if "_lora" in k}  # every adapter moved, nothing else did
    assert model.layers.mlp["up_proj_lora"].a[...].sharding.mesh.shape == mesh.shape
    # The checkpoint holds the adapters (small) and a pointer to the base.
    meta = json.loads(next((tmp_path / "ckpt" / "state").glob("*/meta/metadata")).read_text())
    assert all("_lora" in k for k in meta["param_shapes"])
    assert meta["base"]["source"] == "tiny-llama-seed-9"
    assert meta["base"]["lora"] == {"rank": RANK, "alpha": ALPHA, "targets": list(lora.TARGETS), "base_dtype": "int8"}
    assert meta["base"]["fingerprint"] == lora.base_fingerprint(model)
    # Restoring into a fresh LoRA student of the same base gives the trained adapters; another base is refused.
    restored = restore_model(lora_student(base_dtype="int8"), tmp_path / "ckpt")
    assert_bit_identical(all_state(restored), after)
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        train_tokenized(apply_lora(tiny_model(seed=1), LoRASettings(RANK, ALPHA, base_dtype="int8"), seed=2),
                        make_seqs(count=16), config, mesh=mesh, checkpoint_dir=tmp_path / "ckpt")


@pytest.mark.slow
def test_killed_qlora_run_resumes_bit_identical(tmp_path):
    """The resume harness of tests/train/test_resume.py on an NF4 QLoRA student (SIGKILL after step 10)."""
    expected = flat_params(train_tokenized(lora_student(), make_seqs(), CONFIG, mesh=one_device(),
                                           checkpoint_dir=tmp_path / "straight"))
    ckpt, log_path = tmp_path / "ckpt", tmp_path / "log.jsonl"
    script = KILLED_RUN.format(root=str(REPO_ROOT), ckpt=str(ckpt), log=str(log_path),
                               factory_module="tests.train.test_lora_train", factory="lora_student")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(os.listdir(ckpt / "state")) == ["5"]
    model = train_tokenized(lora_student(), make_seqs(), CONFIG, mesh=one_device(), checkpoint_dir=ckpt,
                            log_path=log_path)
    assert_bit_identical(flat_params(model), expected)
    assert any("_lora" in k for k in expected)
