"""The UNDO loop: stages, run directory, resume, convergence, report (see docs/DESIGN.md).

Names are imported on first use, so that `undo_jax.undo.rundir` or `undo_jax.status` do not pull in JAX.
"""

import importlib

_EXPORTS = {
    "best_iteration": "convergence", "stop_reason": "convergence",
    "UndoError": "loop", "UndoRun": "loop", "run": "loop",
    "RunDir": "rundir", "RunDirError": "rundir",
    "EvalSettings": "student", "StudentError": "student", "evaluate_records": "student", "load_student": "student",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'undo_jax.undo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"undo_jax.undo.{_EXPORTS[name]}"), name)
