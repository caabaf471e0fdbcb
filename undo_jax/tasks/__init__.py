"""Benchmarks: SVAMP, GSM8K, MATH, MMLU-Pro (loading, prompts, answer extraction, scoring). See CONTRACTS.md."""

from __future__ import annotations

from undo_jax.tasks.base import SPLITS, Record, Task, subsample
from undo_jax.tasks.gsm8k import Gsm8kTask
from undo_jax.tasks.hendrycks_math import MathTask
from undo_jax.tasks.mmlu_pro import MmluProTask
from undo_jax.tasks.sources import TaskDataError
from undo_jax.tasks.svamp import SvampTask

TASK_NAMES = ("svamp", "gsm8k", "math", "mmlu_pro")
TASK_CHOICES = (*TASK_NAMES, "math500")  # what get_task accepts (math500: MATH with the 500-problem test set)
_FACTORIES = {"svamp": SvampTask, "gsm8k": Gsm8kTask, "math": MathTask, "mmlu_pro": MmluProTask}


def get_task(name: str, **options) -> Task:
    """A task by name. Options: math takes test_set="full" (5000) or "math500"; "math500" is shorthand for that."""
    if name == "math500":
        return MathTask(test_set="math500")
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)} (or math500)")
    return _FACTORIES[name](**options)


__all__ = ["SPLITS", "TASK_CHOICES", "TASK_NAMES", "Record", "Task", "TaskDataError", "get_task", "subsample"]
