"""Training configuration and the example type the trainer consumes."""

from __future__ import annotations

import dataclasses
from typing import Any

from undo_jax.models.decoder import REMAT_POLICIES

SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16")


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

    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 16
    micro_batch: int = 8
    max_length: int = 1024
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # never applied to norms and biases
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    seed: int = 0
    remat: bool = False  # recompute each decoder layer in the backward pass (less memory, ~1/3 more compute)
    remat_policy: str = "nothing_saveable"  # with remat: what the layer keeps (a jax.checkpoint_policies name)
    compute_dtype: str = "float32"  # float32 | bfloat16 (params and optimizer state stay float32)
    packing: bool = True  # pack several examples per row (segment ids keep them apart); else pad per bucket
    loss_chunk: int = 2048  # tokens per logits chunk in the loss (bounds the [tokens, vocab] buffer); 0 = one chunk
    skip_overlong: bool = True  # a prompt that fills max_length: skip and count it (True) or raise (False)
    save_every: int = 0  # checkpoint every N steps (0: only at epoch ends and the end)
    keep: int = 2  # checkpoints kept by the Orbax manager
    save_epoch_params: bool = False  # also write a params-only snapshot at each epoch end (checkpoint_dir/epochs)
    progress: bool = True  # tqdm bar on the primary process

    def __post_init__(self):
        problems = []
        for name in ("epochs", "batch_size", "micro_batch", "max_length", "keep"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2 (got {self.max_length})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.warmup_ratio <= 1:
            problems.append(f"warmup_ratio must be in [0, 1] (got {self.warmup_ratio})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.remat_policy not in REMAT_POLICIES[1:]:
            problems.append(f"remat_policy must be one of {', '.join(REMAT_POLICIES[1:])} (got {self.remat_policy!r})")
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {self.compute_dtype!r})")
        for name in ("weight_decay", "clip_norm", "save_every", "loss_chunk"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Fields that change the optimisation trajectory: a checkpoint written under other values cannot resume.
    def trajectory_dict(self) -> dict[str, Any]:
        bookkeeping = {"save_every", "keep", "save_epoch_params", "progress"}
        return {k: v for k, v in self.to_dict().items() if k not in bookkeeping}
