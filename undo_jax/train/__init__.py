"""Supervised fine-tuning of the student: completion-only loss, optax AdamW, sharded jitted step, Orbax resume."""

from undo_jax.train.checkpoint import (
    CheckpointMismatchError,
    epoch_params_dir,
    restore_model,
    save_model_checkpoint,
)
from undo_jax.train.config import Example, TrainConfig
from undo_jax.train.data import OverlongPromptError
from undo_jax.train.trainer import completion_loss, train, train_tokenized

__all__ = [
    "CheckpointMismatchError",
    "Example",
    "OverlongPromptError",
    "TrainConfig",
    "completion_loss",
    "epoch_params_dir",
    "restore_model",
    "save_model_checkpoint",
    "train",
    "train_tokenized",
]
