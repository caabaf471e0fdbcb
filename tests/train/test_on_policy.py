"""On-policy distillation (GKD) in the trainer: steps drawn on-policy train on the student's own samples, scored
by the teacher, with the divergence only; the draw and the samples are reproducible, so kill -9 resumes
bit-identically."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import tiny_model, tiny_tokenizer
from undo_jax.sampling import generate
from undo_jax.sharding import make_mesh
from undo_jax.train import TrainConfig, train_tokenized
from undo_jax.train import data as data_lib
from undo_jax.train.distill_loss import distill_loss_sum
from undo_jax.train.on_policy import OnPolicyTeacher, is_on_policy_step, sample_seed
from undo_jax.train.teacher_logits import teacher_targets

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100  # the tiny character tokenizer's size: every sampled id decodes
K = 8
# 4 examples, 2 per step: 2 steps per epoch, 4 in all (few steps: every new batch shape compiles).
CONFIG = TrainConfig(lr=3e-3, epochs=2, batch_size=2, micro_batch=2, max_length=32, packing=True, warmup_ratio=0.2,
                     kd_alpha=0.4, kd_temperature=1.0, kd_divergence="jsd", kd_beta=0.5, on_policy_fraction=0.5,
                     on_policy_temperature=1.0, on_policy_max_new_tokens=8, keep=3, progress=False)


def student(seed=2):
    return tiny_model(seed=seed, vocab_size=VOCAB)


def teacher():
    return OnPolicyTeacher(tiny_model(seed=9, vocab_size=VOCAB), tiny_tokenizer(), K, batch_size=4)


def distilled_seqs(count=4):
    """Random prompt + completion ids with the teacher's targets on the completions (the off-policy data)."""
    rng = np.random.default_rng(4)
    seqs = [data_lib.TokenizedExample(rng.integers(4, VOCAB, size=n).astype(np.int32), int(rng.integers(3, n - 2)))
            for n in rng.integers(8, 20, size=count)]
    scored = list(seqs)
    for group, targets in teacher_targets(teacher().model, seqs, K, batch_size=4):
        for i, t in zip(group, targets, strict=True):
            scored[i] = dataclasses.replace(seqs[i], teacher=t)
    return scored


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def flat_params(model):
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(nnx.state(model, nnx.Param).to_pure_dict()))
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in flat}


def records(log_path):
    return [json.loads(line) for line in Path(log_path).read_text().splitlines()][1:]


def test_the_step_draw_is_reproducible_and_has_the_asked_rate():
    config = dataclasses.replace(CONFIG, on_policy_fraction=0.3)
    draws = [is_on_policy_step(config, s) for s in range(2000)]
    assert draws == [is_on_policy_step(config, s) for s in range(2000)]
    # Binomial(2000, 0.3): standard deviation 20.5 draws; 5 sigma.
    assert abs(sum(draws) - 600) < 103
    assert draws != [is_on_policy_step(dataclasses.replace(config, seed=1), s) for s in range(2000)]
    assert not any(is_on_policy_step(dataclasses.replace(config, on_policy_fraction=0.0), s) for s in range(200))
    assert all(is_on_policy_step(dataclasses.replace(config, on_policy_fraction=1.0), s) for s in range(200))


def test_an_on_policy_step_trains_the_divergence_on_the_students_samples(tmp_path):
    config = dataclasses.replace(CONFIG, on_policy_fraction=1.0, epochs=1)
    seqs = distilled_seqs(2)  # one step
    log = tmp_path / "log.jsonl"
    train_tokenized(student(), seqs, config, mesh=one_device(), log_path=log, on_policy=teacher())
    first = records(log)[0]
    assert first["on_policy"] is True and first["sampled_tokens"] > 0

    # Recompute step 0 by hand: the student before any update samples the step's prompts with the step's seed,
    # the teacher scores the samples, and only the divergence counts (no CE on tokens that are no gold).
    model, tok = student(), tiny_tokenizer()
    step_seqs = [seqs[i] for i in data_lib.step_example_indices(len(seqs), config, 0)]
    prompts = [s.ids[:s.completion_start] for s in step_seqs]
    room = min(config.on_policy_max_new_tokens, config.max_length - max(len(p) for p in prompts))
    outs = generate(model, tok, prompts, max_new_tokens=room, temperature=1.0, seed=sample_seed(config, 0),
                    batch_size=len(prompts))
    samples = [data_lib.TokenizedExample(np.concatenate([p, np.asarray(o.token_ids, np.int32)]), len(p),
                                         ce_weight=0.0) for p, (o,) in zip(prompts, outs, strict=True)]
    assert sum(len(s) - s.completion_start for s in samples) == first["sampled_tokens"]
    for group, targets in teacher_targets(teacher().model, samples, K, batch_size=4):
        for i, t in zip(group, targets, strict=True):
            samples[i] = dataclasses.replace(samples[i], teacher=t)
    settings = config.distill_settings()
    total = count = kd = 0.0
    for b in data_lib.step_micro_batches(samples, config):
        arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
        assert float(arrays["ce_mask"].sum()) == 0.0
        loss, parts = distill_loss_sum(model, arrays, arrays, settings)
        total, count, kd = total + float(loss), count + float(parts["count"]), kd + float(parts["kd_sum"])
    assert count == first["completion_tokens"]
    np.testing.assert_allclose(first["loss"], total / count, rtol=1e-5)
    np.testing.assert_allclose(first["loss"], (1 - settings.alpha) * kd / count, rtol=1e-5)


def test_no_on_policy_step_trains_exactly_like_logit_distillation(tmp_path):
    config = dataclasses.replace(CONFIG, on_policy_fraction=0.0, epochs=1)
    seqs = distilled_seqs()
    a = train_tokenized(student(), seqs, config, mesh=one_device(), log_path=tmp_path / "a.jsonl",
                        on_policy=teacher())
    b = train_tokenized(student(), seqs, config, mesh=one_device(), log_path=tmp_path / "b.jsonl")
    pa, pb = flat_params(a), flat_params(b)
    assert all(np.array_equal(pa[n], pb[n]) for n in pa)
    assert [r["on_policy"] for r in records(tmp_path / "a.jsonl")] == [False] * 2


def test_on_policy_needs_teacher_targets_on_the_examples():
    plain = [dataclasses.replace(s, teacher=None) for s in distilled_seqs(4)]
    with pytest.raises(ValueError, match="on-policy distillation needs examples with teacher targets"):
        train_tokenized(student(), plain, CONFIG, mesh=one_device(), on_policy=teacher())


# Trains in a fresh process and SIGKILLs itself at the end of epoch 2 (step 4, before the final checkpoint),
# once the step-2 checkpoint is on disk: the restart resumes from step 2 and must sample the same tokens.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from tests.train.test_on_policy import CONFIG, distilled_seqs, one_device, student, teacher
    from undo_jax.train import train_tokenized

    def die(epoch, model):
        if epoch == 2:
            while not os.path.isdir(os.path.join({ckpt!r}, "state", "2")):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    train_tokenized(student(), distilled_seqs(), CONFIG, mesh=one_device(), checkpoint_dir={ckpt!r},
                    log_path={log!r}, epoch_end_callback=die, on_policy=teacher())
    raise SystemExit("not killed")
""")


def test_kill_during_on_policy_training_resumes_bit_identically(tmp_path):
    draws = [is_on_policy_step(CONFIG, s) for s in range(4)]
    assert any(draws[2:]) and not all(draws), draws  # the resumed half samples, and both kinds of step occur
    seqs = distilled_seqs()
    straight = train_tokenized(student(), seqs, CONFIG, mesh=one_device(), checkpoint_dir=tmp_path / "straight",
                               log_path=tmp_path / "straight.jsonl", on_policy=teacher())
    ckpt, log = tmp_path / "killed", tmp_path / "killed.jsonl"
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN.format(root=str(REPO_ROOT), ckpt=str(ckpt),
                                                                   log=str(log))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = train_tokenized(student(), seqs, CONFIG, mesh=one_device(), checkpoint_dir=ckpt, log_path=log,
                              on_policy=teacher())
    a, b = flat_params(straight), flat_params(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    assert [r["on_policy"] for r in records(log)] == draws
    assert [r["loss"] for r in records(log)] == [r["loss"] for r in records(tmp_path / "straight.jsonl")]
