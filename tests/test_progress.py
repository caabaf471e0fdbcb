"""Progress off a terminal: plain log lines every --progress_every units (what a launcher's log file shows)."""

from __future__ import annotations

import logging

from undo_jax import progress


def test_plain_lines_every_n_units_and_at_the_end(caplog, monkeypatch):
    monkeypatch.setattr(progress, "_EVERY", 50)
    caplog.set_level(logging.INFO, logger="undo_jax.progress")
    bar = progress.progress_bar(120, "gemini:flash", unit="req")  # pytest's stderr is not a terminal
    for i in range(120):
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}", refresh=False)
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        "gemini:flash: 50/120 req (42%)", "gemini:flash: 100/120 req (83%)", "gemini:flash: 120/120 req (100%)"]
    assert "loss=0.01" in lines[1] and "eta" in lines[0] and "eta" not in lines[2]


def test_no_lines_when_disabled(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="undo_jax.progress")
    monkeypatch.setattr(progress, "_EVERY", 0)
    with progress.progress_bar(10, "train", unit="step") as bar:
        bar.update(10)
    monkeypatch.setattr(progress, "_EVERY", 1)
    with progress.progress_bar(10, "train", unit="step", enabled=False) as bar:
        bar.update(10)
    assert caplog.records == []
