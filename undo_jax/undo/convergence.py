"""When to stop iterating, and which iteration is the result (pure functions of validation accuracies)."""

from __future__ import annotations

from collections.abc import Sequence


def stop_reason(val_accuracies: Sequence[float], *, epsilon_points: float, patience: int, max_iterations: int,
                early_stop: bool = True) -> str | None:
    """None to continue, else why the loop stops after the last iteration in `val_accuracies`.

    `val_accuracies[i]` is iteration i+1's validation accuracy (a fraction). An iteration is flat when it
    improves on the best earlier iteration by less than `epsilon_points` accuracy points; `patience` flat
    iterations in a row stop the loop. Iteration 1 is never flat (there is nothing to compare it with).
    """
    k = len(val_accuracies)
    if k >= max_iterations:
        return f"reached --max_iterations={max_iterations}"
    if not early_stop or k < 2:
        return None
    flat = 0
    for i in range(1, k):
        gain = 100.0 * (val_accuracies[i] - max(val_accuracies[:i]))
        flat = flat + 1 if gain < epsilon_points else 0
    if flat >= patience:
        return (f"validation accuracy improved by less than {epsilon_points:g} points for {flat} iteration(s) "
                f"(--patience={patience})")
    return None


def best_iteration(val_accuracies: Sequence[float]) -> int:
    """1-based iteration with the highest validation accuracy (the earliest on ties)."""
    if not val_accuracies:
        raise ValueError("best_iteration: no iterations")
    best = max(val_accuracies)
    return 1 + list(val_accuracies).index(best)
