"""Pure training math: completion-only loss, the optax optimizer, and the jitted step functions.

Params are a plain nested dict (`nnx.State.to_pure_dict()`); the model is rebuilt inside the traced
function with `nnx.merge(graphdef, params)`. A step is: per micro-batch, gradients of the summed
token loss (accumulated in float32 with the loss sum and the completion-token count), then one update
with gradients divided by the step's token count: the same as a mean over all completion tokens of
the global batch, however it was split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from undo_jax.train.config import TrainConfig

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# Extra micro-batch arrays of logit distillation (teacher targets aligned with `targets`, and the CE weights).
TEACHER_KEYS = ("top_logp", "top_ids", "log_tail", "ce_mask")


# ---------------------------------------------------------------- loss
def token_nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked positions of -log p(target); integer targets, never a one-hot."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask)


def completion_loss_sum(model, batch: dict[str, jax.Array], *, remat: bool | str = False, chunk: int = 0
                        ) -> tuple[jax.Array, jax.Array]:
    """(sum of completion-token NLL, number of completion tokens) for one micro-batch.

    remat: False, or a `jax.checkpoint_policies` name applied to every decoder layer (True: nothing_saveable).
    """
    hidden = model.hidden_states(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                 remat=remat)
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    r, t, d = hidden.shape
    n = r * t
    if chunk <= 0 or chunk >= n:
        return token_nll_sum(model.logits_from_hidden(hidden), batch["targets"], mask), count
    # Chunk the [tokens, vocab] logits: each chunk's logits are recomputed in the backward pass, so
    # at most one chunk of them is alive at a time.
    num_chunks = math.ceil(n / chunk)
    pad = num_chunks * chunk - n
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
    flat_y = jnp.pad(batch["targets"].reshape(n), (0, pad)).reshape(num_chunks, chunk)
    flat_m = jnp.pad(mask.reshape(n), (0, pad)).reshape(num_chunks, chunk)

    @jax.checkpoint
    def one(h, y, m):
        return token_nll_sum(model.logits_from_hidden(h), y, m)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (flat_h, flat_y, flat_m))
    return total, count


# ---------------------------------------------------------------- optimizer
def learning_rate_schedule(config: TrainConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup (first step already at lr/warmup, never 0), then cosine / linear / constant decay."""
    warmup = int(math.ceil(config.warmup_ratio * total_steps)) if config.warmup_ratio > 0 else 0
    decay_steps = max(total_steps - warmup, 1)
    peak, floor = config.lr, config.lr * config.min_lr_ratio

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * (count + 1) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        if config.schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        elif config.schedule == "linear":
            decayed = peak + (floor - peak) * progress
        else:
            decayed = jnp.asarray(peak, jnp.float32)
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def decay_mask(params) -> dict:
    """True for weights that get weight decay: not norms (any `*norm*` module) and not biases."""

    def decays(path, _leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on already-normalised gradients; global-norm clipping first, as in PyTorch practice."""
    adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.adam_b1, b2=config.adam_b2,
                        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
    if config.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
    return adamw


# ---------------------------------------------------------------- step functions
def make_step_functions(graphdef, tx: optax.GradientTransformation, schedule, config: TrainConfig):
    """Pure functions (not yet jitted): first_grads, add_grads, apply_update, single_step.

    State is {"params", "opt_state", "step"}; an accumulator is {"grads", "loss_sum", "count"}. `frozen`
    (optional, last argument) is the untrained rest of the model (a LoRA model's base), merged in as is.
    """

    def grads_of(params, batch, frozen):
        def loss_fn(p):
            model = nnx.merge(graphdef, p) if frozen is None else nnx.merge(graphdef, p, frozen)
            remat = config.remat and config.remat_policy  # False, or the policy name
            if "top_ids" in batch:  # logit distillation: CE on the rationale plus the teacher divergence
                from undo_jax.train.distill_loss import distill_loss_sum

                teacher = {k: batch[k] for k in TEACHER_KEYS}
                total, parts = distill_loss_sum(model, batch, teacher, config.distill_settings(), remat=remat,
                                                chunk=config.loss_chunk)
                return total, parts["count"]
            total, count = completion_loss_sum(model, batch, remat=remat, chunk=config.loss_chunk)
            return total, count

        (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return {"grads": grads, "loss_sum": loss_sum, "count": count}

    def first_grads(params, batch, frozen=None):
        return grads_of(params, batch, frozen)

    def add_grads(params, acc, batch, frozen=None):
        return jax.tree.map(jnp.add, acc, grads_of(params, batch, frozen))

    def apply_update(state, acc):
        count = jnp.maximum(acc["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, acc["grads"])
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": acc["loss_sum"] / count, "tokens": acc["count"], "grad_norm": grad_norm,
                   "lr": schedule(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def single_step(state, batch, frozen=None):
        return apply_update(state, grads_of(state["params"], batch, frozen))

    return first_grads, add_grads, apply_update, single_step
