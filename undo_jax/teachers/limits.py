"""Rate limiting (requests and tokens per minute), retry backoff, and secret scrubbing."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class TokenBucket:
    """Continuous-refill bucket holding at most `per_minute` units (a per-minute limit)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"rate limit must be > 0 per minute, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = float(per_minute) / 60.0
        self.level = float(per_minute)
        self.clock = clock
        self.stamp = clock()

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` units are available (0 when they are, which takes them)."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        amount = min(float(amount), self.capacity)  # a single oversize request still goes, alone
        # The tolerance absorbs float rounding: sleeping exactly the returned time must suffice.
        if self.level >= amount - 1e-6:
            self.level = max(0.0, self.level - amount)
            return 0.0
        return (amount - self.level) / self.rate


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limiter for one event loop (None = unlimited)."""

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
    ):
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None
        self.sleep = sleep
        self._lock: asyncio.Lock | None = None

    async def acquire(self, tokens: int) -> None:
        if self.requests is None and self.tokens is None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        # One waiter at a time keeps the order fair (FIFO on the lock) and the buckets consistent.
        async with self._lock:
            for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
                if bucket is None:
                    continue
                while (delay := bucket.wait_time(amount)) > 0:
                    await self.sleep(delay)


@dataclass
class RetryPolicy:
    """Bounded exponential backoff with full jitter; a server-given delay is honoured as a floor."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0  # never sleep longer than this on a server hint

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Sleep before retry number `attempt` (0-based)."""
        backoff = min(self.max_delay, self.base_delay * (2**attempt))
        jittered = backoff * (0.5 + 0.5 * rng.random())
        if retry_after is not None and retry_after > 0:
            return min(self.max_retry_after, retry_after) + 0.1 * jittered
        return jittered


_RETRY_DELAY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*s?\s*$")


def parse_retry_after(header_value: str | None) -> float | None:
    """Retry-After header (seconds; HTTP dates are ignored) or a google.rpc.RetryInfo delay ('1.5s')."""
    if not header_value:
        return None
    m = _RETRY_DELAY_RE.match(str(header_value))
    return float(m.group(1)) if m else None


def retry_delay_from_google_details(details) -> float | None:
    """The `retryDelay` of a google.rpc.RetryInfo entry in a Gemini error body, if present."""
    try:
        err = details.get("error", details) if isinstance(details, dict) else None
        for item in (err or {}).get("details", []) or []:
            if isinstance(item, dict) and "retryDelay" in item:
                return parse_retry_after(item["retryDelay"])
    except (AttributeError, TypeError):
        return None
    return None


_KEY_QUERY_RE = re.compile(r"([?&](?:key|api_key|apikey)=)[^&\s'\"]+", re.IGNORECASE)
_BEARER_RE = re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+", re.IGNORECASE)
_GOOG_HEADER_RE = re.compile(r"(x-goog-api-key['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+", re.IGNORECASE)
REDACTED = "[REDACTED]"


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove API keys from a message: the known secrets verbatim, plus key-like URL/header patterns."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    text = _KEY_QUERY_RE.sub(r"\1" + REDACTED, text)
    text = _BEARER_RE.sub(r"\1" + REDACTED, text)
    return _GOOG_HEADER_RE.sub(r"\1" + REDACTED, text)
