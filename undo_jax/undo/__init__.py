"""The UNDO loop: stages, run directory, resume, convergence, report (see docs/DESIGN.md)."""

from undo_jax.undo.convergence import best_iteration, stop_reason
from undo_jax.undo.loop import UndoError, UndoRun, run
from undo_jax.undo.rundir import RunDir, RunDirError
from undo_jax.undo.student import EvalSettings, StudentError, evaluate_records, load_student

__all__ = [
    "EvalSettings",
    "RunDir",
    "RunDirError",
    "StudentError",
    "UndoError",
    "UndoRun",
    "best_iteration",
    "evaluate_records",
    "load_student",
    "run",
    "stop_reason",
]
