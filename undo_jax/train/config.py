"""Training configuration and the example type the trainer consumes."""

from __future__ import annotations

import dataclasses
from typing import Any

from undo_jax.configtree import check_fields, setting

SCHEDULES = ("cosine", "linear", "constant")
KD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
COMPUTE_DTYPES = ("float32", "bfloat16")
# jax.checkpoint_policies names (undo_jax.models.decoder.REMAT_POLICIES without "none"; a test keeps them equal).
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class Example:
    """One supervised pair: a chat prompt (message dicts, or a string = one user turn) and the reply."""

    prompt: list[dict[str, str]] | str
    completion: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised fine-tuning settings (defaults are ours: the UNDO paper does not publish its own).

    A step consumes `batch_size` examples. They run as micro-batches of `micro_batch` rows (a row is
    one padded example, or with `packing` several examples packed into `max_length` tokens); the
    gradients of all micro-batches are summed and divided by the step's completion-token count.
    """

    lr: float = setting(1e-5, "Peak learning rate.", gt=0)
    epochs: int = setting(1, "Epochs of this training call (the loop sets it from --epochs_first/--epochs_later).",
                          min=1, flag=None)
    batch_size: int = setting(16, "Examples per optimizer step.", min=1)
    micro_batch: int = setting(8, "Rows per micro-batch (gradient accumulation).", min=1)
    max_length: int = setting(1024, "Training sequence length (prompt + rationale tokens).", min=2)
    warmup_ratio: float = setting(0.03, "Warm-up fraction of the steps.", min=0, max=1)
    schedule: str = setting("cosine", "Learning-rate decay after warm-up.", choices=SCHEDULES)
    min_lr_ratio: float = setting(0.0, "The decay ends at lr * min_lr_ratio.", min=0, max=1)
    weight_decay: float = setting(0.0, "AdamW weight decay (never applied to norms and biases).", min=0)
    adam_b1: float = setting(0.9, "Adam beta1.", min=0, max=1)
    adam_b2: float = setting(0.999, "Adam beta2.", min=0, max=1)
    adam_eps: float = setting(1e-8, "Adam epsilon.", gt=0)
    clip_norm: float = setting(1.0, "Global gradient-norm clip (0 disables).", min=0)
    seed: int = setting(0, "Seed of training (data order).")
    remat: bool = setting(False, "Recompute each decoder layer in the backward pass (less memory, ~1/3 more "
                                 "compute).")
    remat_policy: str = setting("nothing_saveable", "With --remat: what each layer keeps for the backward pass "
                                                    "(a jax.checkpoint_policies name).", choices=REMAT_POLICIES)
    compute_dtype: str = setting("float32", "Training compute dtype (params and optimizer state stay float32).",
                                 choices=COMPUTE_DTYPES)
    packing: bool = setting(True, "Pack several examples per row (segment ids keep them apart); else pad per "
                                  "bucket.")
    loss_chunk: int = setting(2048, "Tokens per logits chunk in the loss (bounds the [tokens, vocab] buffer); "
                                    "0 = one chunk.", min=0)
    kd_alpha: float = setting(0.5, "Logit distillation: weight of the CE on the rationale tokens; the teacher "
                                   "divergence gets 1 - kd_alpha (scaled by kd_temperature^2).", min=0, max=1)
    kd_temperature: float = setting(1.0, "Logit distillation: softmax temperature of teacher and student.", gt=0)
    kd_divergence: str = setting("forward_kl", "Logit distillation: divergence between teacher and student "
                                               "(jsd: generalized JSD with kd_beta, as TRL's GKD).",
                                 choices=KD_DIVERGENCES)
    kd_beta: float = setting(0.5, "Logit distillation: beta of the generalized JSD (0 = forward KL, 1 = reverse KL).",
                             min=0, max=1)
    on_policy_fraction: float = setting(0.5, "On-policy distillation (--distill=on_policy): probability per step "
                                             "that the step's completions are sampled from the current student and "
                                             "scored by the teacher (GKD's lambda).", min=0, max=1)
    on_policy_temperature: float = setting(1.0, "On-policy distillation: sampling temperature of the student's "
                                                "completions (0 = greedy).", min=0)
    on_policy_max_new_tokens: int = setting(256, "On-policy distillation: tokens sampled per completion at most "
                                                 "(never past --max_length).", min=1)
    skip_overlong: bool = setting(True, "A prompt that fills max_length: skip and count it (else an error).")
    save_every: int = setting(0, "Trainer checkpoint every N steps (0: epoch ends only).", min=0)
    keep: int = setting(2, "Step checkpoints the Orbax manager keeps while an iteration trains.", min=1,
                        flag="keep_checkpoints", identity=False)
    save_epoch_params: bool = setting(False, "Also write a params-only snapshot at each epoch end.",
                                      identity=False)
    progress: bool = setting(True, "tqdm bar on the primary process (the program sets it).", flag=None)

    def __post_init__(self):
        check_fields(self)  # ConfigError (a ValueError) naming the setting by its flag

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def distill_settings(self):
        """The loss settings used when the examples carry teacher targets (logit distillation)."""
        from undo_jax.train.distill_loss import DistillSettings

        return DistillSettings(alpha=self.kd_alpha, temperature=self.kd_temperature, divergence=self.kd_divergence,
                               beta=self.kd_beta)

    # Fields that change the optimisation trajectory: a checkpoint written under other values cannot resume.
    def trajectory_dict(self) -> dict[str, Any]:
        bookkeeping = {"save_every", "keep", "save_epoch_params", "progress"}
        return {k: v for k, v in self.to_dict().items() if k not in bookkeeping}
