"""Cache, ledger, rate limiter, retry policy, scrubbing and the subprocess loopback server."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3

import pytest

from undo_jax.teachers import CostLedger, ResponseCache, SampleResult, TeacherRequest, cache_key
from undo_jax.teachers.limits import (
    RateLimiter,
    RetryPolicy,
    TokenBucket,
    parse_retry_after,
    retry_delay_from_google_details,
    scrub,
)
from undo_jax.testing.servers import fetch_stats, post_script, start_server_subprocess


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_cache_key_covers_what_changes_the_answer_and_ignores_context():
    base = TeacherRequest(msgs("q"))
    k = cache_key("gemini", "m", base)
    assert k == cache_key("gemini", "m", TeacherRequest(msgs("q"), context={"record": object()}))
    variants = [
        cache_key("openai", "m", base),
        cache_key("gemini", "m2", base),
        cache_key("gemini", "m", TeacherRequest(msgs("q2"))),
        cache_key("gemini", "m", TeacherRequest([{"role": "system", "content": "s"}, *msgs("q")])),
        cache_key("gemini", "m", TeacherRequest(msgs("q"), temperature=0.5)),
        cache_key("gemini", "m", TeacherRequest(msgs("q"), max_output_tokens=7)),
        cache_key("gemini", "m", TeacherRequest(msgs("q"), cache_salt="iter2")),
        cache_key("gemini", "m", base, {"thinking_budget": 0}),
    ]
    assert len({k, *variants}) == len(variants) + 1


def test_cache_roundtrip_across_connections_wal_and_first_writer_wins(tmp_path):
    path = tmp_path / "sub" / "c.sqlite"
    a, b = ResponseCache(path), ResponseCache(path)
    assert a.get("k", 0) is None
    a.put("k", 0, "gemini", "m", SampleResult("first", "stop", 3, 4, {"x": 1}))
    b.put("k", 0, "gemini", "m", SampleResult("second", "stop", 1, 1))
    b.put("k", 1, "gemini", "m", SampleResult("sample1", "length", 1, 1))
    got = b.get("k", 0)
    assert (got.text, got.finish_reason, got.input_tokens, got.output_tokens, got.metadata) == (
        "first",
        "stop",
        3,
        4,
        {"x": 1},
    )
    assert a.get("k", 1).text == "sample1" and a.count() == 2
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    a.close()
    b.close()


def test_ledger_prices_and_atomic_save(tmp_path):
    ledger = CostLedger()
    ledger.set_prices("gemini", "m", 0.30, 2.50)
    ledger.add_call("gemini", "m", 1_000_000, 200_000)
    ledger.add_cache_hit("gemini", "m")
    ledger.add_error("openai", "x")
    d = ledger.to_dict()
    assert d["gemini/m"]["cost_usd"] == pytest.approx(0.30 + 0.5)
    assert d["gemini/m"]["cache_hits"] == 1 and d["openai/x"]["errors"] == 1
    assert "$0.8000" in ledger.summary()
    out = tmp_path / "ledger.json"
    ledger.save(out)
    assert json.loads(out.read_text())["total_cost_usd"] == pytest.approx(0.8)
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="prices must be >= 0"):
        ledger.set_prices("gemini", "m", -1, 0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_rate_limiter_requests_and_tokens_per_minute_on_a_fake_clock():
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=None, clock=clock, sleep=clock.sleep)

    async def run(n, tokens):
        for _ in range(n):
            await limiter.acquire(tokens)

    asyncio.run(run(60, 1))  # the first minute's budget is available at once
    assert clock.now == 0.0
    asyncio.run(run(30, 1))  # then one request per second
    assert clock.now == pytest.approx(30.0)
    clock2 = FakeClock()
    tokens = RateLimiter(rpm=None, tpm=1000, clock=clock2, sleep=clock2.sleep)

    async def run2():
        for _ in range(5):
            await tokens.acquire(500)

    asyncio.run(run2())  # 2500 tokens at 1000/min: 1000 at once, 1500 more take 90 s
    assert clock2.now == pytest.approx(90.0)
    bucket = TokenBucket(10, clock=FakeClock())
    assert bucket.wait_time(50) == 0.0  # an oversize request still goes alone
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(0)


def test_retry_policy_bounded_jittered_and_honours_server_delay():
    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=8.0)
    rng = random.Random(0)
    for attempt in range(10):
        d = policy.delay(attempt, None, rng)
        cap = min(8.0, 2.0**attempt)
        assert cap / 2 <= d <= cap
    assert policy.delay(0, 12.0, rng) >= 12.0
    assert policy.delay(0, 10_000.0, rng) <= policy.max_retry_after + policy.max_delay


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("1.5s") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None and parse_retry_after(None) is None
    details = {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]}}
    assert retry_delay_from_google_details(details) == 17.0
    assert retry_delay_from_google_details({"error": {}}) is None


def test_scrub_removes_keys_in_all_forms():
    text = "GET https://h/v1?key=AIzaXYZ&alt=json Authorization: Bearer sk-abc.123 x-goog-api-key: 'AIzaQQQ' raw s3cr3t"
    out = scrub(text, ["s3cr3t"])
    for secret in ("AIzaXYZ", "sk-abc.123", "AIzaQQQ", "s3cr3t"):
        assert secret not in out
    assert "alt=json" in out


@pytest.mark.parametrize("protocol", ["gemini", "openai"])
def test_server_runs_as_a_subprocess_with_scripted_faults(protocol, monkeypatch):
    import urllib.error
    import urllib.request

    monkeypatch.setenv("LOOPBACK_KEY", "k-123")
    proc, base_url = start_server_subprocess(protocol, api_key_env="LOOPBACK_KEY", script={"hi": ["503"]})
    try:
        post_script(base_url, {"later": ["500"]})
        if protocol == "gemini":
            url, body, headers = (
                f"{base_url}/v1beta/models/m:generateContent",
                {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                {"x-goog-api-key": "k-123"},
            )
        else:
            url, body, headers = (
                f"{base_url}/chat/completions",
                {"model": "m", "messages": msgs("hi")},
                {"Authorization": "Bearer k-123"},
            )

        def call():
            r = urllib.request.Request(
                url,
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json", **headers},
            )
            with urllib.request.urlopen(r, timeout=10) as resp:
                return json.loads(resp.read())

        with pytest.raises(urllib.error.HTTPError) as err:
            call()
        assert err.value.code == 503
        answer = call()
        text = (
            answer["candidates"][0]["content"]["parts"][0]["text"]
            if protocol == "gemini"
            else answer["choices"][0]["message"]["content"]
        )
        assert text == "Echo: hi"
        stats = fetch_stats(base_url)
        assert stats["counts"] == {"hi": 2} and stats["completed"] == {"hi": 1} and stats["faults"] == {"503": 1}
    finally:
        proc.kill()
        proc.wait()
