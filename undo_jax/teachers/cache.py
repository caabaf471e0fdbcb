"""SQLite response cache: one row per (request key, sample index), committed as each arrives.

WAL mode plus one transaction per row means a response that was received is on disk before the
next one is awaited, so a killed run re-sends only what never came back. Errors are never stored,
so a re-run retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Any

from undo_jax.teachers.types import SampleResult, TeacherRequest

SCHEMA_VERSION = 1
RESPONSE_COLUMNS = ("key", "sample_index", "backend", "model", "text", "finish_reason", "input_tokens",
                    "output_tokens", "metadata", "created")


class CacheError(ValueError):
    """The cache file cannot be used (message: one line naming the file)."""


def cache_key(backend: str, model: str, request: TeacherRequest, params: dict[str, Any] | None = None) -> str:
    """Stable hash of everything that determines a response (never the local-only `context`)."""
    payload = {
        "v": SCHEMA_VERSION,
        "backend": backend,
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
        "temperature": float(request.temperature),
        "max_output_tokens": int(request.max_output_tokens),
        "cache_salt": request.cache_salt,
        "params": params or {},
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def unusable_message(path: str | os.PathLike, why: object) -> str:
    return (f"{os.fspath(path)}: not a usable teacher cache ({why}); move it away to start a new one (the teacher "
            f"is then asked again) or restore it")


class ResponseCache:
    """Persistent map (key, sample_index) -> SampleResult, safe across threads and processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as e:  # not SQLite, damaged, or another program's database
            raise CacheError(unusable_message(self.path, e)) from None

    @staticmethod
    def problem(path: str | os.PathLike) -> str | None:
        """Why the existing file `path` cannot be used as a cache (None: it can), read-only: nothing is written."""
        try:
            conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True)
        except sqlite3.Error as e:
            return unusable_message(path, e)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "responses" in tables:
                columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
                if columns != list(RESPONSE_COLUMNS):
                    return unusable_message(path, f"its responses table has columns {', '.join(columns)}")
                conn.execute("SELECT COUNT(*) FROM responses").fetchone()
        except sqlite3.DatabaseError as e:
            return unusable_message(path, e)
        finally:
            conn.close()
        return None

    def _open(self) -> sqlite3.Connection:
        # timeout: another process may hold the write lock for a moment (WAL allows one writer).
        conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False, isolation_level=None)
        try:
            # Read before writing anything: a file that is not our cache is refused unchanged.
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "responses" in tables:
                columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
                if columns != list(RESPONSE_COLUMNS):
                    raise sqlite3.DatabaseError(f"its responses table has columns {', '.join(columns)}")
                conn.execute("SELECT COUNT(*) FROM responses").fetchone()  # a damaged file fails here
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT NOT NULL, sample_index INTEGER NOT NULL,"
                " backend TEXT NOT NULL, model TEXT NOT NULL,"
                " text TEXT NOT NULL, finish_reason TEXT NOT NULL,"
                " input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,"
                " metadata TEXT NOT NULL, created REAL NOT NULL,"
                " PRIMARY KEY (key, sample_index))"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS batch_jobs ("
                " job_name TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL,"
                " units TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL)"
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def get(self, key: str, sample_index: int) -> SampleResult | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT text, finish_reason, input_tokens, output_tokens, metadata FROM responses"
                " WHERE key=? AND sample_index=?",
                (key, sample_index),
            ).fetchone()
        if row is None:
            return None
        return SampleResult(row[0], row[1], int(row[2]), int(row[3]), json.loads(row[4]))

    def put(self, key: str, sample_index: int, backend: str, model: str, result: SampleResult) -> None:
        """Store one sample in its own transaction (durable before the call returns)."""
        with self._lock:
            # INSERT OR IGNORE: a concurrent process that stored the same sample first wins;
            # both texts are valid answers to the same request and the first is what others saw.
            self._conn.execute(
                "INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    key,
                    sample_index,
                    backend,
                    model,
                    result.text,
                    result.finish_reason,
                    int(result.input_tokens),
                    int(result.output_tokens),
                    json.dumps(result.metadata, ensure_ascii=False, sort_keys=True),
                    time.time(),
                ),
            )

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    # Batch jobs (Gemini Batch API): the job name is recorded before polling, so a killed run
    # resumes the submitted job instead of submitting (and paying for) the same requests again.
    def record_batch_job(self, job_name: str, backend: str, model: str, units: list[list[Any]]) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO batch_jobs VALUES (?,?,?,?,?,?)",
                (job_name, backend, model, json.dumps(units), "submitted", time.time()),
            )

    def finish_batch_job(self, job_name: str, state: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE batch_jobs SET state=? WHERE job_name=?", (state, job_name))

    def open_batch_jobs(self, backend: str, model: str) -> list[tuple[str, list[list[Any]]]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT job_name, units FROM batch_jobs WHERE backend=? AND model=? AND state='submitted'"
                " ORDER BY created",
                (backend, model),
            ).fetchall()
        return [(name, json.loads(units)) for name, units in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
