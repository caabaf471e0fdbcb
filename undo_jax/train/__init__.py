"""Supervised fine-tuning of the student: completion-only loss, optax AdamW, sharded jitted step, Orbax resume.

Names are loaded on first use, so `undo_jax.train.config` (the settings) imports without JAX.
"""

import importlib

_HOME = {
    "CheckpointMismatchError": "checkpoint",
    "epoch_params_dir": "checkpoint",
    "restore_model": "checkpoint",
    "save_model_checkpoint": "checkpoint",
    "Example": "config",
    "TrainConfig": "config",
    "OverlongPromptError": "data",
    "completion_loss": "trainer",
    "train": "trainer",
    "train_tokenized": "trainer",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


__all__ = sorted(_HOME)
