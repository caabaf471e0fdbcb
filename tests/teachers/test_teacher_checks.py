"""Through a real teacher (OpenAI protocol, loopback server): request checks before anything is sent, the
requests- and tokens-per-minute limits as the server sees them, and an unusable response cache."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from undo_jax.teachers import SampleResult, TeacherRequest, make_teacher
from undo_jax.teachers.cache import CacheError, ResponseCache
from undo_jax.testing.servers import LoopbackServer, reply_for

REPO = Path(__file__).resolve().parents[2]


def req(prompt: str, **kw) -> TeacherRequest:
    return TeacherRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}], **kw)


def openai_teacher(server: LoopbackServer, **kw):
    return make_teacher("openai", model="loop-model", base_url=server.base_url, api_key_env="UNDO_TEST_NO_KEY",
                        max_retries=0, timeout_s=5, **kw)


@pytest.mark.parametrize("bad, error, match", [
    ("not a request", TypeError, r"openai teacher: requests\[1\] is str, not TeacherRequest"),
    (TeacherRequest([]), ValueError, r"requests\[1\]: messages must be a non-empty list"),
    (TeacherRequest([{"role": "robot", "content": "x"}]), ValueError, r"requests\[1\]: messages\[0\] must be"),
    (TeacherRequest([{"role": "user", "content": 3}]), ValueError, r"requests\[1\]: messages\[0\] must be"),
    (TeacherRequest([{"role": "system", "content": "s"}]), ValueError, r"requests\[1\]: messages hold no 'user'"),
    (req("x", num_samples=0), ValueError, r"requests\[1\]: num_samples must be >= 1, got 0"),
    (req("x", max_output_tokens=0), ValueError, r"requests\[1\]: max_output_tokens must be >= 1, got 0"),
    (req("x", temperature=-0.5), ValueError, r"requests\[1\]: temperature must be >= 0, got -0.5"),
])
def test_bad_request_is_refused_before_any_is_sent(tmp_path, bad, error, match):
    with LoopbackServer("openai") as server:
        teacher = openai_teacher(server, cache_path=str(tmp_path / "cache.sqlite"))
        try:
            with pytest.raises(error, match=match) as e:
                teacher.generate([req("fine"), bad])
            assert "\n" not in str(e.value)
            assert server.stats()["total"] == 0  # the good request before it was not sent either
            assert all(entry.get("calls", 0) == 0 for entry in teacher.ledger.to_dict().values())
            assert teacher.generate([req("fine")])[0].texts == [reply_for("fine")]  # still usable
        finally:
            teacher.close()


def arrival_times(server: LoopbackServer) -> list[float]:
    """Instrument the server: the monotonic time at which each request arrives."""
    times: list[float] = []
    inner = server.state.next_action

    def recording(prompt: str) -> str:
        times.append(time.monotonic())
        return inner(prompt)

    server.state.next_action = recording
    return times


# 62 requests against a limit whose bucket holds 60 of them: the first 60 may go at once, then one per second
# (the bucket refills at limit / 60 per second), so the 61st and 62nd arrive >= 1 s and >= 2 s after the start.
@pytest.mark.parametrize("limit", ["rpm", "tpm"])
def test_rate_limits_hold_requests_back(limit):
    requests = [req(f"q{i:02d}", max_output_tokens=100) for i in range(62)]
    from undo_jax.teachers.base import estimate_tokens

    per_request = estimate_tokens(requests[0])
    assert {estimate_tokens(r) for r in requests} == {per_request}
    options = {"rpm": 60} if limit == "rpm" else {"tpm": 60 * per_request}
    with LoopbackServer("openai") as server:
        times = arrival_times(server)
        teacher = openai_teacher(server, concurrency=16, **options)
        try:
            start = time.monotonic()
            responses = teacher.generate(requests)
        finally:
            teacher.close()
    assert [r.texts for r in responses] == [[reply_for(f"q{i:02d}")] for i in range(62)]
    assert len(times) == 62 and times[0] >= start
    times.sort()
    # Lower bounds only (a slow machine makes them easier to meet); the 0.2 s absorbs the bucket's clock
    # starting a moment before the first request leaves.
    assert times[60] - start >= 0.8 and times[61] - start >= 1.8, [round(t - start, 2) for t in times[58:]]


def _real_cache(path: Path, rows: int) -> None:
    cache = ResponseCache(path)
    for i in range(rows):
        cache.put(f"k{i}", 0, "openai", "m", SampleResult("x" * 2000, "stop", 1, 1))
    cache.close()


def _other_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE responses (key TEXT, answer TEXT)")
        conn.execute("INSERT INTO responses VALUES ('a', 'b')")
    conn.close()


def _truncated(path: Path) -> None:
    _real_cache(path, 400)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"this is not a database, only text " * 8), "file is not a database"),
    (lambda p: p.write_bytes(b"\0" * 8192), "file is not a database"),
    (_other_schema, "columns key, answer"),
    (_truncated, "malformed"),
])
def test_unusable_cache_is_one_line_and_left_as_it_was(tmp_path, make, reason):
    path = tmp_path / "teacher_cache.sqlite"
    make(path)
    before = path.read_bytes()
    with pytest.raises(CacheError, match=reason) as e:
        make_teacher("openai", model="m", cache_path=str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_cache.sqlite"]


def test_main_stops_on_an_unusable_cache_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cache = run_dir / "teacher_cache.sqlite"
    cache.write_bytes(b"not sqlite " * 100)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    student = tmp_path / "student"  # passes the cheap student check; the cache is checked before anything loads
    student.mkdir()
    (student / "config.json").write_text("{}")
    (student / "tokenizer.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "undo_jax.main", f"--run_dir={run_dir}", f"--student={student}", "--data_source=demo",
         "--val_size=8", "--teacher=openai", "--teacher_model=m", "--teacher_base_url=http://127.0.0.1:9/v1"],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("undo_jax.main: error:")]
    assert len(errors) == 1 and str(cache) in errors[0] and "not a usable teacher cache" in errors[0], proc.stderr
    assert cache.read_bytes() == b"not sqlite " * 100
