"""Gemini (real google-genai client) and OpenAI-compatible teachers against loopback servers:
faults, bounded retries, Retry-After, caching, kill-and-resume, and no key leaks."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from undo_jax.teachers import TeacherRequest, make_teacher
from undo_jax.teachers.cache import cache_key
from undo_jax.testing.servers import LoopbackServer, reply_for

KEY_ENV = {"gemini": "GEMINI_API_KEY", "openai": "OPENAI_API_KEY"}
# A fake key shaped like a real one (assembled so secret scanners do not flag the source file).
SECRET = "AIza" + "SyCANARY-0123456789-abcdefghijkl"
DRIVER = Path(__file__).with_name("drive_teacher.py")
REPO = Path(__file__).resolve().parents[2]

FAULTS = {
    "ok-plain": [],
    "rate-limited": ["429:1", "ok"],
    "internal": ["500", "ok"],
    "unavailable": ["503", "503", "ok"],
    "slow": ["slow:3", "ok"],
    "malformed": ["malformed", "ok"],
    "dropped": ["drop", "ok"],
    "blocked": ["safety"],
    "no-candidates": ["empty"],
    "always-500": ["500"] * 10,
}


def req(prompt: str, **kw) -> TeacherRequest:
    return TeacherRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}], **kw)


@pytest.fixture(params=["gemini", "openai"])
def backend(request, monkeypatch):
    monkeypatch.setenv(KEY_ENV[request.param], SECRET)
    return request.param


def make(backend: str, server: LoopbackServer, cache_path=None, **kw):
    opts = dict(
        model="loop-model",
        base_url=server.base_url,
        cache_path=cache_path,
        concurrency=8,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
        max_retries=3,
        timeout_s=1,
    )
    opts.update(kw)
    return make_teacher(backend, **opts)


def test_fault_matrix_every_request_ends_in_text_or_error(backend, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="undo_jax.teachers")
    with LoopbackServer(backend, api_key=SECRET, script=FAULTS) as server:
        teacher = make(backend, server, tmp_path / "cache.sqlite")
        prompts = list(FAULTS) + [f"bulk{k}" for k in range(20)]
        out = teacher.generate([req(p) for p in prompts])
        stats = server.stats()
        ledger = teacher.ledger.to_dict()[f"{backend}/loop-model"]
        teacher.close()
    assert len(out) == len(prompts)
    by_prompt = dict(zip(prompts, out, strict=True))
    failing = {"blocked", "no-candidates", "always-500"}
    for p, r in by_prompt.items():
        if p in failing:
            assert r.error and not r.texts, (p, r)
        else:
            assert r.error is None and r.texts == [reply_for(p)] and r.finish_reasons == ["stop"], (p, r)
            assert r.usage["input_tokens"] > 0 and r.usage["output_tokens"] > 0
    assert "blocked" in by_prompt["blocked"].error or "filter" in by_prompt["blocked"].error
    assert "gave up after 4 attempts" in by_prompt["always-500"].error
    # Exact attempt counts: our retries only (the SDK's are off), bounded by max_retries=3.
    counts = stats["counts"]
    assert counts["always-500"] == 4
    assert counts["blocked"] == 1 and counts["no-candidates"] == 1  # permanent errors: not retried
    assert counts["unavailable"] == 3
    for p in ("rate-limited", "internal", "slow", "malformed", "dropped"):
        assert counts[p] == 2, p
    assert all(counts[f"bulk{k}"] == 1 for k in range(20))
    assert stats["auth_failures"] == 0
    assert ledger["calls"] == len(prompts) - 3 and ledger["errors"] == 3
    # The 429 carried Retry-After: 1; the scheduled delay honours it (a decision, not a wall-clock check).
    delays = [float(m.group(1)) for m in re.finditer(r"retry \d+ in ([0-9.]+)s after: .*429", caplog.text)]
    assert delays and min(delays) >= 1.0


def test_cache_serves_repeat_and_errors_are_retried(backend, tmp_path):
    cache = tmp_path / "cache.sqlite"
    with LoopbackServer(backend, api_key=SECRET, script={"flaky": ["safety"]}) as server:
        t1 = make(backend, server, cache)
        first = t1.generate([req("a"), req("b", num_samples=2), req("flaky")])
        t1.close()
        assert [r.cached for r in first] == [False, False, False] and first[2].error
        assert first[1].texts == [reply_for("b")] * 2 and first[1].finish_reasons == ["stop", "stop"]
        t2 = make(backend, server, cache)  # a new process would see the same file
        second = t2.generate([req("a"), req("b", num_samples=2), req("flaky"), req("a", temperature=0.7)])
        ledger = t2.ledger.to_dict()[f"{backend}/loop-model"]
        t2.close()
        counts = server.stats()["counts"]
    assert [r.cached for r in second] == [True, True, False, False]
    assert second[0].texts == first[0].texts and second[2].texts == [reply_for("flaky")]
    assert counts == {"a": 2, "b": 2, "flaky": 2}  # 'a' again only for the new temperature
    assert ledger["cache_hits"] == 3 and ledger["calls"] == 2


def _cached_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {row[0] for row in con.execute("SELECT key FROM responses")}
    except sqlite3.OperationalError:  # table not created yet
        return set()
    finally:
        con.close()


def test_kill_mid_batch_then_rerun_sends_only_unfinished(backend, tmp_path):
    from tests.teachers.drive_teacher import batch_requests

    n = 40
    cache = tmp_path / "cache.sqlite"
    env = {**os.environ, KEY_ENV[backend]: SECRET, "PYTHONPATH": str(REPO)}
    with LoopbackServer(backend, api_key=SECRET, latency=0.05) as server:
        cmd = [
            sys.executable,
            str(DRIVER),
            "--backend",
            backend,
            "--base-url",
            server.base_url,
            "--cache",
            str(cache),
            "--n",
            str(n),
            "--concurrency",
            "4",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while len(_cached_keys(cache)) < 10:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "driver made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before_keys = _cached_keys(cache)
        counts_before = dict(server.stats()["counts"])
        assert 10 <= len(before_keys) < n, "the kill must land mid-batch"
        rerun = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
        summary = json.loads(rerun.stdout.decode().strip().splitlines()[-1])
        counts_after = dict(server.stats()["counts"])
    assert summary == {"ok": n, "cached": len(before_keys)}
    probe = make_teacher(backend, model="loop-model", base_url=server.base_url)
    params = probe.cache_params()
    probe.close()
    requests = batch_requests(n)
    keys = [cache_key(backend, "loop-model", r, params) for r in requests]
    assert set(keys) == _cached_keys(cache)
    resent = 0
    for r, k in zip(requests, keys, strict=True):
        prompt = r.messages[-1]["content"]
        delta = counts_after.get(prompt, 0) - counts_before.get(prompt, 0)
        if k in before_keys:
            assert delta == 0, f"{prompt} was answered and cached before the kill, yet sent again"
        else:
            assert delta == 1, f"{prompt} unfinished at the kill: expected exactly one new request, got {delta}"
        resent += delta
        assert counts_after[prompt] <= 2  # at most: in flight at the kill, then once more
    assert resent == n - len(before_keys)


def test_api_key_never_leaks(backend, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # every logger, including the SDK's and the HTTP client's
    cache = tmp_path / "run" / "teacher_cache.sqlite"
    script = {"echo-key": ["leak"], "retry-then-ok": ["429:0.01", "500", "ok"], "blocked": ["safety"]}
    with LoopbackServer(backend, api_key=SECRET, script=script) as server:
        teacher = make(backend, server, cache)
        out = teacher.generate([req(p) for p in ["plain", "echo-key", "retry-then-ok", "blocked"]])
        teacher.ledger.save(tmp_path / "run" / "ledger.json")
        (tmp_path / "run" / "responses.json").write_text(json.dumps([r.to_dict() for r in out]))
        teacher.close()
        assert server.stats()["auth_failures"] == 0  # the key was sent, and accepted
    assert out[1].error and "REDACTED" in out[1].error  # the server echoed it; we scrubbed it
    errors = [r.error or "" for r in out]
    raised = []
    with pytest.raises(ValueError) as bad_request:
        teacher = make(backend, server)
        try:
            teacher.generate([TeacherRequest([])])
        finally:
            teacher.close()
    raised.append(str(bad_request.value))
    if backend == "gemini":
        os.environ.pop("GEMINI_API_KEY", None)
        with pytest.raises(ValueError) as missing:
            make_teacher("gemini", model="m")
        raised.append(str(missing.value))
    outputs = capfd.readouterr()
    haystacks = [caplog.text, outputs.out, outputs.err, *raised, *errors]
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            haystacks.append(path.read_bytes().decode("utf-8", "replace"))
    assert len(haystacks) >= 9
    for text in haystacks:
        assert SECRET not in text


def test_gemini_batch_api_submit_poll_collect_and_resume(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    cache = tmp_path / "cache.sqlite"
    prompts = ["b0", "b1", "b2", "b-blocked", "b-fail"]
    with LoopbackServer("gemini", api_key=SECRET, script={"b-blocked": ["safety"], "b-fail": ["500"]}) as server:
        # First run gives up polling at once: the job stays open in the cache, unanswered.
        t1 = make("gemini", server, cache, batch_mode=True, batch_poll_interval=0.01, batch_max_wait=0.0)
        first = t1.generate([req(p) for p in prompts])
        t1.close()
        assert all(r.error and "re-run to collect" in r.error for r in first)
        assert server.stats()["batches"] == 1
        # Second run resumes the same job (no new submission) and collects it.
        t2 = make("gemini", server, cache, batch_mode=True, batch_poll_interval=0.01)
        second = t2.generate([req(p) for p in prompts])
        t2.close()
        stats = server.stats()
        assert stats["batches"] == 1
        assert [r.texts for r in second[:3]] == [[reply_for(p)] for p in prompts[:3]]
        assert "SAFETY" in second[3].error and "batch item error" in second[4].error
        # Third run: answered ones come from the cache; only the two failures are submitted again.
        t3 = make("gemini", server, cache, batch_mode=True, batch_poll_interval=0.01)
        third = t3.generate([req(p) for p in prompts])
        t3.close()
        stats = server.stats()
    assert [r.cached for r in third] == [True, True, True, False, False]
    assert stats["batches"] == 2
    assert third[3].texts == [reply_for("b-blocked")] and third[4].texts == [reply_for("b-fail")]
    assert stats["counts"] == {"b0": 1, "b1": 1, "b2": 1, "b-blocked": 2, "b-fail": 2}


def test_thinking_settings_reach_the_request(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    seen = []
    from undo_jax.testing import servers as testing_servers

    original = testing_servers._gemini_answer

    def spy(state, body, prompt):
        seen.append(body.get("generationConfig", {}))
        return original(state, body, prompt)

    monkeypatch.setattr(testing_servers, "_gemini_answer", spy)
    with LoopbackServer("gemini", api_key=SECRET) as server:
        teacher = make("gemini", server, thinking_budget=128)
        teacher.generate([req("think", temperature=0.3, max_output_tokens=77)])
        teacher.close()
    thinking = seen[0]["thinkingConfig"]
    # The SDK sends this field in proto field-name form; the API accepts both spellings.
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 128, thinking
    assert seen[0]["temperature"] == 0.3 and seen[0]["maxOutputTokens"] == 77


def test_bad_input_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown teacher 'claude'"):
        make_teacher("claude")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        make_teacher("gemini", model="m")
    monkeypatch.setenv("GOOGLE_API_KEY", SECRET)
    with LoopbackServer("gemini", api_key=SECRET) as server:
        teacher = make("gemini", server)
        with pytest.raises(ValueError, match=r"requests\[1\]: messages hold no 'user' message"):
            teacher.generate([req("x"), TeacherRequest([{"role": "system", "content": "s"}])])
        assert teacher.generate([req("x")])[0].texts == [reply_for("x")]  # GOOGLE_API_KEY works too
        teacher.close()


@pytest.mark.parametrize("batch_api", [True, False])
def test_teacher_batch_api_flag_reaches_the_gemini_batch_protocol(batch_api, monkeypatch, tmp_path):
    """--teacher_batch_api (TeacherConfig.batch_api) through make_teacher: one Batch API job, or online calls."""
    from undo_jax.config import TeacherConfig

    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    prompts = ["f0", "f1", "f2"]
    with LoopbackServer("gemini", api_key=SECRET) as server:
        config = TeacherConfig(backend="gemini", model="loop-model", base_url=server.base_url, batch_api=batch_api)
        teacher = make_teacher(config, cache_path=str(tmp_path / "cache.sqlite"), batch_poll_interval=0.01)
        out = teacher.generate([req(p) for p in prompts])
        teacher.close()
        stats = server.stats()
    assert [r.texts for r in out] == [[reply_for(p)] for p in prompts]
    assert stats["batches"] == (1 if batch_api else 0)
