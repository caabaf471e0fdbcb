"""The Teacher interface: cache lookup, dispatch of the missing samples, accounting, assembly.

A request with `num_samples=n` is n units (request, sample index); each unit is cached, sent,
retried and accounted on its own, so a re-run after a kill sends only the units never stored.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from undo_jax.teachers.cache import ResponseCache, cache_key
from undo_jax.teachers.ledger import CostLedger
from undo_jax.teachers.limits import RateLimiter, RetryPolicy, scrub
from undo_jax.teachers.types import SampleResult, TeacherCallError, TeacherRequest, TeacherResponse

log = logging.getLogger("undo_jax.teachers")

Unit = tuple[int, int]  # (request index, sample index)
OnResult = Callable[[Unit, "SampleResult | str"], None]  # str = final error message


def estimate_tokens(request: TeacherRequest) -> int:
    """Rough prompt+output token count for the tokens-per-minute limiter (4 chars per token)."""
    chars = sum(len(m["content"]) for m in request.messages)
    return chars // 4 + 1 + int(request.max_output_tokens)


class Teacher:
    """Base class. Subclasses set `backend`, `model` and implement `_dispatch`."""

    backend: str = "base"
    model: str = ""
    cacheable: bool = True

    def __init__(
        self,
        *,
        cache_path: str | None = None,
        ledger: CostLedger | None = None,
        price_input_per_mtok: float = 0.0,
        price_output_per_mtok: float = 0.0,
    ):
        self.cache = ResponseCache(cache_path) if (cache_path and self.cacheable) else None
        self.ledger = ledger if ledger is not None else CostLedger()
        self.ledger.set_prices(self.backend, self.model, price_input_per_mtok, price_output_per_mtok)

    # Extra generation settings that change the output (e.g. thinking budget); part of the cache key.
    def cache_params(self) -> dict[str, Any]:
        return {}

    def secrets(self) -> tuple[str, ...]:
        return ()

    def response_metadata(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model}

    def generate(self, requests: Sequence[TeacherRequest], *, progress: bool = False) -> list[TeacherResponse]:
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, TeacherRequest):
                raise TypeError(f"{self.backend} teacher: requests[{i}] is {type(r).__name__}, not TeacherRequest")
            r.validate(f"{self.backend} teacher: requests[{i}]")
        params = self.cache_params()
        keys = [cache_key(self.backend, self.model, r, params) for r in requests]
        results: dict[Unit, SampleResult | str] = {}
        cached_units: set[Unit] = set()
        missing: list[Unit] = []
        for i, r in enumerate(requests):
            for s in range(r.num_samples):
                hit = self.cache.get(keys[i], s) if self.cache else None
                if hit is not None:
                    results[(i, s)] = hit
                    cached_units.add((i, s))
                    self.ledger.add_cache_hit(self.backend, self.model)
                else:
                    missing.append((i, s))
        lock = threading.Lock()

        def on_result(unit: Unit, result: SampleResult | str) -> None:
            # Called as each unit finishes: the cache commit here is what makes a kill lose nothing.
            with lock:
                if isinstance(result, SampleResult):
                    if self.cache:
                        self.cache.put(keys[unit[0]], unit[1], self.backend, self.model, result)
                    self.ledger.add_call(self.backend, self.model, result.input_tokens, result.output_tokens)
                else:
                    result = scrub(str(result), self.secrets())
                    self.ledger.add_error(self.backend, self.model)
                results[unit] = result

        if missing:
            self._dispatch(requests, keys, missing, on_result, progress)
        return [self._assemble(i, r, results, cached_units) for i, r in enumerate(requests)]

    def _assemble(self, i: int, r: TeacherRequest, results: dict, cached_units: set) -> TeacherResponse:
        texts, reasons, errors, meta = [], [], [], dict(self.response_metadata())
        usage = {"input_tokens": 0, "output_tokens": 0}
        for s in range(r.num_samples):
            res = results.get((i, s), "no result (the backend returned nothing for this sample)")
            if isinstance(res, SampleResult):
                texts.append(res.text)
                reasons.append(res.finish_reason)
                usage["input_tokens"] += res.input_tokens
                usage["output_tokens"] += res.output_tokens
                meta.update(res.metadata)
            else:
                errors.append(f"sample {s}: {res}" if r.num_samples > 1 else res)
        cached = all((i, s) in cached_units for s in range(r.num_samples))
        return TeacherResponse(texts, reasons, usage, "; ".join(errors) if errors else None, cached, meta)

    def _dispatch(
        self, requests: list[TeacherRequest], keys: list[str], units: list[Unit], on_result: OnResult, progress: bool
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        log.info("%s", self.ledger.summary())
        if self.cache:
            self.cache.close()
            self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncAPITeacher(Teacher):
    """A remote API teacher: async calls under a concurrency cap, RPM/TPM limits and bounded retries.

    Subclasses implement `async _call(request, sample_index) -> SampleResult`, raising
    TeacherCallError (retryable or not) or any transport exception (see `classify_exception`).
    """

    def __init__(
        self,
        *,
        concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if concurrency < 1:
            raise ValueError(f"{self.backend} teacher: concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"{self.backend} teacher: timeout_s must be > 0, got {timeout_s}")
        self.concurrency = int(concurrency)
        self.rpm, self.tpm = rpm, tpm
        self.timeout_s = float(timeout_s)
        self.retry = RetryPolicy(max_retries=max_retries, base_delay=retry_base_delay, max_delay=retry_max_delay)
        self._rng = random.Random(seed)
        # One private event loop in a daemon thread: async HTTP clients stay bound to one loop,
        # and generate() works whether or not the caller already runs an event loop.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.backend}-teacher", daemon=True)
        self._thread.start()

    def classify_exception(self, exc: BaseException) -> TeacherCallError:
        """Map a transport exception to a TeacherCallError. Timeouts and connection errors retry."""
        if isinstance(exc, TeacherCallError):
            return exc
        name = type(exc).__name__
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in name:
            return TeacherCallError(f"timeout after {self.timeout_s:g}s ({name})", retryable=True)
        if isinstance(exc, (ConnectionError, OSError)) or any(
            k in name for k in ("Connect", "Network", "RemoteProtocol", "ReadError", "WriteError", "Protocol")
        ):
            return TeacherCallError(f"connection error ({name}: {exc})", retryable=True)
        return TeacherCallError(f"{name}: {exc}", retryable=False)

    async def _call(self, request: TeacherRequest, sample_index: int) -> SampleResult:
        raise NotImplementedError

    async def _call_with_retries(self, request: TeacherRequest, sample_index: int, limiter: RateLimiter):
        attempt = 0
        while True:
            await limiter.acquire(estimate_tokens(request))
            try:
                # wait_for is a backstop: the client's own timeout should fire first.
                return await asyncio.wait_for(self._call(request, sample_index), timeout=self.timeout_s + 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a per-request outcome
                err = self.classify_exception(exc)
            msg = scrub(str(err), self.secrets())
            if not err.retryable or attempt >= self.retry.max_retries:
                suffix = f" (gave up after {attempt + 1} attempts)" if err.retryable else ""
                return msg + suffix
            delay = self.retry.delay(attempt, err.retry_after, self._rng)
            log.info("%s teacher: retry %d in %.2fs after: %s", self.backend, attempt + 1, delay, msg)
            self.ledger.add_retry(self.backend, self.model)
            attempt += 1
            await asyncio.sleep(delay)

    async def _run_all(self, requests, units, on_result, progress) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        limiter = RateLimiter(self.rpm, self.tpm)
        bar = None
        if progress:
            from undo_jax.progress import progress_bar

            bar = progress_bar(len(units), f"{self.backend}:{self.model}", unit="req")

        async def one(unit: Unit) -> None:
            async with sem:
                result = await self._call_with_retries(requests[unit[0]], unit[1], limiter)
            on_result(unit, result)
            if bar is not None:
                bar.update(1)

        try:
            await asyncio.gather(*(one(u) for u in units))
        finally:
            if bar is not None:
                bar.close()

    def _dispatch(self, requests, keys, units, on_result, progress) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._run_all(requests, units, on_result, progress), self._loop)
        fut.result()

    async def _aclose(self) -> None:
        pass

    def close(self) -> None:
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result(timeout=10)
            except Exception as exc:  # noqa: BLE001 - closing must not mask the run's own outcome
                log.debug("%s teacher: close failed: %s", self.backend, scrub(str(exc), self.secrets()))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        super().close()
