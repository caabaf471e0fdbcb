"""The run directory: paths, atomic writes, stage completion markers and the flags.txt guard.

Layout (docs/DESIGN.md): run.lock (held by the running process 0), flags.txt and config.json (the resolved
configuration tree), identity.json, teacher_cache.sqlite, metrics.jsonl, report.md, accuracy.png, final/,
tb/ (TensorBoard), and per iteration iter_K/ with data.jsonl, gaps.md, checkpoint/ (Orbax, the trainer's),
eval_val.jsonl, eval_test.jsonl, train_log.jsonl
and `<stage>.DONE` markers. A marker is written only after the stage's outputs are in place (each written to
a temporary file and renamed), so a marker always means "complete" and a kill never leaves a half file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class RunDirError(RuntimeError):
    """The run directory cannot be used (unwritable, or made by a different command)."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file. With `tolerate_torn_tail`, an unterminated last line (a kill mid-write) is dropped."""
    rows = []
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_tail = i == len(lines)  # text did not end with "\n": this line was cut short
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and is_tail:
                break
            raise RunDirError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return rows


def append_jsonl_durable(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync: a chunk is on disk before the next one is computed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class RunLock:
    """An exclusive `fcntl` lock on RUN/run.lock, holding the holder's host and pid.

    The kernel drops the lock when its process dies, so a killed run's lock is simply taken over (the
    file still names the dead holder; the new holder overwrites it). Held by process 0 only.
    """

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "run.lock"
        self._fd: int | None = None
        self._record: dict[str, Any] = {}
        self.previous: dict[str, Any] | None = None  # the holder named in the file when we took it

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            from undo_jax.preflight import lock_message

            raise RunDirError(lock_message(self.path.parent, self.holder())) from None
        previous = self.holder()
        self.previous = previous if previous and "ended" not in previous else None  # a killed holder's record
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._fd = fd
        self._write(self._record)

    def _write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def note(self, **fields: Any) -> None:
        """Record what the holder is doing (e.g. the current stage) in the lock file, for `undo_jax.status`."""
        if self._fd is not None:
            self._record = {**self._record, **fields}
            self._write(self._record)

    def release(self, error: str | None = None) -> None:
        """Unlock; the file is emptied, or keeps the holder's record with `error` (a run that stopped on one in
        a stage; a refusal before the first stage leaves the file as empty as it found it)."""
        if self._fd is not None:
            if error is None or "stage" not in self._record:
                os.ftruncate(self._fd, 0)
            else:
                self._write({**self._record, "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "error": error})
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class RunDir:
    """Paths and markers of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ----- paths ---------------------------------------------------------------------------------------------
    @property
    def flags_path(self) -> Path:
        return self.root / "flags.txt"

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def cache_path(self) -> Path:
        return self.root / "teacher_cache.sqlite"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def plot_path(self) -> Path:
        return self.root / "accuracy.png"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def iter_dir(self, k: int) -> Path:
        return self.root / f"iter_{k}"

    def marker(self, k: int, stage: str) -> Path:
        return self.iter_dir(k) / f"{stage}.DONE"

    # ----- markers -------------------------------------------------------------------------------------------
    def is_done(self, k: int, stage: str) -> bool:
        return self.marker(k, stage).is_file()

    def mark_done(self, k: int, stage: str, info: dict[str, Any] | None = None) -> None:
        """Write iter_K/<stage>.DONE holding `info` (e.g. the stage's wall time and teacher usage)."""
        atomic_write_json(self.marker(k, stage), {"stage": stage, "finished_unix": time.time(), **(info or {})})

    def marker_info(self, k: int, stage: str) -> dict[str, Any] | None:
        path = self.marker(k, stage)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # markers are written atomically: this one was damaged from outside
            raise RunDirError(f"{path}: corrupt stage marker (not JSON); delete it to redo that stage") from None

    def iterations(self) -> list[int]:
        """Iteration numbers that have a directory, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit():
                out.append(int(p.name[5:]))
        return sorted(out)

    # ----- creation and the flags guard -------------------------------------------------------------------
    def ensure_writable(self) -> None:
        """Create the directory if needed; RunDirError (one line) when it cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write_probe.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"{self.root}: run directory is not writable ({e.strerror or e})") from None

    def prepare(self, flag_lines: list[str], identity: dict[str, Any], *, allow_change: bool,
                defaults: dict[str, Any] | None = None) -> bool:
        """Create (or reopen) the directory; returns True when it already held a run.

        A new directory gets flags.txt and identity.json. An existing one with finished stages must have been
        made with the same identity flags, unless `allow_change` (then the new flags are recorded beside the old
        ones); one without a finished stage counts as new. A setting missing from an older identity.json had its
        value in `defaults` (it did not exist yet).
        """
        from undo_jax.preflight import PreflightError, identity_change, identity_problem

        self.ensure_writable()
        identity_path = self.root / "identity.json"
        existed = identity_path.is_file()
        try:
            changed = identity_change(self.root, identity, defaults=defaults)
            problem = identity_problem(self.root, identity, allow_change=allow_change, defaults=defaults)
        except PreflightError as e:
            raise RunDirError(str(e)) from None
        if problem:
            raise RunDirError(problem)
        if changed and self.flags_path.is_file():  # keep the earlier flags beside the new ones
            os.replace(self.flags_path, self.root / f"flags.{time.strftime('%Y%m%d-%H%M%S')}.txt")
        atomic_write_json(identity_path, identity)
        atomic_write_text(self.flags_path, "\n".join(flag_lines) + "\n")
        return existed
