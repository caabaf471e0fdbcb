"""TensorBoard scalars of a run under RUN/tb/ (tensorboardX event files; the JSONL logs stay the record).

Per training step: train/loss, train/lr, train/grad_norm, train/tokens_per_s (the step counts on across
iterations); per iteration: accuracy/validation and accuracy/test (step = iteration, 0 = the base student).
Written by process 0 when the stage that produced the numbers runs, so a resumed run adds no duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")


class ScalarLog:
    """A lazily opened SummaryWriter; `enabled=False` makes every call a no-op (--notensorboard)."""

    def __init__(self, directory: str | Path, *, enabled: bool):
        self.directory = Path(directory)
        self.enabled = enabled
        self._writer = None

    def check(self) -> str | None:
        """Why the log cannot be written (tensorboardX missing), or None."""
        if self.enabled:
            import importlib.util

            if importlib.util.find_spec("tensorboardX") is None:
                return "--tensorboard needs the tensorboardX package (pip install tensorboardX) or --notensorboard"
        return None

    def _w(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(self.directory))
        return self._writer

    def train_steps(self, rows: list[dict[str, Any]], *, step_offset: int) -> None:
        if not self.enabled:
            return
        for row in rows:
            if "loss" not in row:
                continue
            for name in TRAIN_SCALARS:
                if name in row:
                    self._w().add_scalar(f"train/{name}", float(row[name]), step_offset + int(row["step"]))
        self.flush()

    def accuracy(self, split: str, iteration: int, value: float) -> None:
        if self.enabled:
            self._w().add_scalar(f"accuracy/{split}", float(value), iteration)
            self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(directory: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every scalar in the event files under `directory` (in file, then record order).

    Reads the TFRecord framing (length, CRC, payload, CRC) with tensorboardX's Event protobuf; CRCs unchecked.
    """
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            payload = data[pos + 12: pos + 12 + length]
            pos += 12 + length + 4
            if len(payload) < length:
                break  # a torn last record (killed writer)
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
