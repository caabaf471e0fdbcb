"""Stopping rule and best-iteration choice."""

import pytest

from undo_jax.undo.convergence import best_iteration, stop_reason


def test_continues_while_improving():
    assert stop_reason([0.30], epsilon_points=0.5, patience=1, max_iterations=4) is None
    assert stop_reason([0.30, 0.40], epsilon_points=0.5, patience=1, max_iterations=4) is None


def test_stops_on_flat_iteration_with_patience_one():
    reason = stop_reason([0.30, 0.303], epsilon_points=0.5, patience=1, max_iterations=4)
    assert reason is not None and "patience" in reason


def test_patience_counts_consecutive_flat_iterations():
    accs = [0.30, 0.40, 0.401]
    assert stop_reason(accs, epsilon_points=0.5, patience=2, max_iterations=9) is None
    assert stop_reason(accs + [0.38], epsilon_points=0.5, patience=2, max_iterations=9) is not None
    # An improvement in between resets the count.
    assert stop_reason([0.3, 0.3, 0.5, 0.5], epsilon_points=0.5, patience=2, max_iterations=9) is None


def test_flat_is_measured_against_the_best_so_far():
    # 0.45 beats its predecessor but not the best earlier iteration (0.5): flat.
    assert stop_reason([0.5, 0.4, 0.45], epsilon_points=0.5, patience=2, max_iterations=9) is not None


def test_max_iterations_and_standard_mode():
    assert "max_iterations" in stop_reason([0.1, 0.2], epsilon_points=0.5, patience=1, max_iterations=2)
    assert stop_reason([0.3, 0.3], epsilon_points=0.5, patience=1, max_iterations=4, early_stop=False) is None


def test_best_iteration_prefers_earliest_on_ties():
    assert best_iteration([0.2, 0.5, 0.5, 0.4]) == 2
    with pytest.raises(ValueError):
        best_iteration([])
