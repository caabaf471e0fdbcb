"""Progress of long loops: a tqdm bar on a terminal, plain log lines every N units elsewhere.

A cloud run's output goes to a file (`launch/` pipes it through `tee` or `nohup`), where a bar is noise or
nothing at all; there `progress_bar` logs `"<desc>: 150/7273 (2%), loss=0.41, 3.1/s, eta 38m"` every
`--progress_every` units (set once by the entry point through `configure`). Call sites use the tqdm subset
`update`, `set_postfix`, `close` and `with`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("undo_jax.progress")
_EVERY = 50


def configure(every: int) -> None:
    """Plain lines every `every` units when stderr is not a terminal (0: none)."""
    global _EVERY
    _EVERY = int(every)


class PlainProgress:
    def __init__(self, total: int, desc: str, unit: str, every: int, initial: int = 0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self._last = initial
        self._start, self._initial = time.monotonic(), initial
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._last >= self.every or (self.n >= self.total > self._last):
            self._last = self.n
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        eta = f", eta {(self.total - self.n) / rate / 60:.0f}m" if rate > 0 and self.total > self.n else ""
        log.info("%s: %d/%d %s%s%s, %.2f %s/s%s", self.desc, self.n, self.total, self.unit, pct, extra, rate,
                 self.unit, eta)

    def close(self) -> None:
        pass

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoProgress(PlainProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress_bar(total: int, desc: str, *, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar (stderr is a terminal), a `PlainProgress` (it is not, and lines are configured), or nothing."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    if enabled and _EVERY > 0:
        return PlainProgress(total, desc, unit, _EVERY, initial)
    return _NoProgress(total, desc, unit, 1, initial)
