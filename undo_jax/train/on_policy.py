"""On-policy distillation (GKD, Agarwal et al. 2024): some steps train on the student's own samples, scored by
the teacher.

On a step drawn on-policy (probability `TrainConfig.on_policy_fraction`, drawn from (seed, step) so a resumed
run draws the same), every example of the step keeps its prompt, but its completion is replaced by one the
current student samples with the project's sampler (`on_policy_temperature`, at most `on_policy_max_new_tokens`
and never past `max_length`); the teacher, which shares the student's mesh, then scores exactly those tokens
(`teacher_logits.teacher_targets`). These samples carry `ce_weight=0`: they are no gold, so only the divergence
term of the loss trains on them. Off-policy steps train as `--distill=logits` does.

A sample depends only on the student's params before the step and on (seed, step), so a run killed and resumed
from a checkpoint samples the same tokens again (bit-identical resume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from undo_jax.train.data import TokenizedExample


@dataclasses.dataclass(frozen=True)
class OnPolicyTeacher:
    """What on-policy steps need besides the config: the teacher model, the student's tokenizer (its end tokens
    stop a sample) and the teacher's top-k (as the cached off-policy targets)."""

    model: object  # CausalLM sharing the student's vocabulary
    tokenizer: object
    top_k: int
    batch_size: int = 8  # teacher forward rows per call


def is_on_policy_step(config, step: int) -> bool:
    """Whether optimizer step `step` (0-based) trains on student samples: a draw from (seed, step) alone."""
    if config.on_policy_fraction <= 0:
        return False
    return bool(np.random.default_rng([config.seed, step, 0x6B64]).random() < config.on_policy_fraction)


def sample_seed(config, step: int) -> int:
    return int(np.random.default_rng([config.seed, step, 0x5A4D]).integers(0, 2**31 - 1))


def student_samples(student, teacher: OnPolicyTeacher, seqs: Sequence[TokenizedExample], config, step: int, *,
                    mesh=None) -> tuple[list[TokenizedExample], dict]:
    """`seqs` with their completions replaced by the student's samples and the teacher's targets on them.

    Returns (examples, {"sampled_tokens", "finished"}): a sample that ends at an end token keeps it (the
    student learns to stop); one cut by the length limit is kept as far as it got.
    """
    from undo_jax.sampling import generate
    from undo_jax.train.teacher_logits import teacher_targets

    prompts = [np.asarray(s.ids[:s.completion_start], np.int32) for s in seqs]
    room = config.max_length - max(len(p) for p in prompts)
    new_tokens = min(config.on_policy_max_new_tokens, room)
    if new_tokens < 1:
        raise ValueError(f"train: on-policy step {step}: a prompt of {max(len(p) for p in prompts)} tokens leaves no "
                         f"room for a sample within --max_length={config.max_length}")
    outs = generate(student, teacher.tokenizer, prompts, max_new_tokens=new_tokens,
                    temperature=config.on_policy_temperature, seed=sample_seed(config, step), mesh=mesh,
                    batch_size=max(len(prompts), 1))
    examples, sampled, finished = [], 0, 0
    for prompt, (out,) in zip(prompts, outs, strict=True):
        completion = np.asarray(out.token_ids, np.int32)[: config.max_length - len(prompt)]
        if completion.size == 0:  # nothing sampled: keep one end token so the example still has a target
            completion = np.asarray([teacher.tokenizer.eos_token_id or 0], np.int32)
        sampled += int(completion.size)
        finished += out.finish_reason != "length"
        examples.append(TokenizedExample(np.concatenate([prompt, completion]), len(prompt), ce_weight=0.0))
    scored = list(examples)
    for group, targets in teacher_targets(teacher.model, examples, teacher.top_k, batch_size=teacher.batch_size,
                                          mesh=mesh):
        for i, t in zip(group, targets, strict=True):
            scored[i] = dataclasses.replace(examples[i], teacher=t)
    return scored, {"sampled_tokens": sampled, "finished": finished}
