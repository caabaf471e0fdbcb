"""Gemini teacher through the google-genai SDK (`genai.Client`), online or through the Batch API.

Retries are ours alone: the SDK is built with `HttpRetryOptions(attempts=1)`, so the request
counts that tests check are exact. The key travels in the `x-goog-api-key` header (never in a
URL) and is scrubbed from every message we record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from undo_jax.teachers.base import AsyncAPITeacher, Unit
from undo_jax.teachers.limits import parse_retry_after, retry_delay_from_google_details, scrub
from undo_jax.teachers.types import SampleResult, TeacherCallError, TeacherRequest

log = logging.getLogger("undo_jax.teachers")

BLOCKING_FINISH_REASONS = {
    "SAFETY",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_SAFETY",
    "MALFORMED_FUNCTION_CALL",
    "LANGUAGE",
    "OTHER",
}
FINISH_REASON_NAMES = {"STOP": "stop", "MAX_TOKENS": "length"}
TERMINAL_BATCH_STATES = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def api_key_from_env() -> str:
    key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
    if not key:
        raise ValueError("gemini teacher: no API key; set GEMINI_API_KEY or GOOGLE_API_KEY in the environment")
    return key


def to_gemini_contents(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Chat messages -> (system instruction, Gemini `contents`); 'assistant' becomes role 'model'."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    contents = [
        {"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]}
        for m in messages
        if m["role"] != "system"
    ]
    return system, contents


def parse_candidate(response) -> SampleResult:
    """A GenerateContentResponse -> SampleResult; blocked or empty answers raise a non-retryable error."""
    usage = getattr(response, "usage_metadata", None)
    n_in = int(getattr(usage, "prompt_token_count", None) or 0)
    n_out = int(getattr(usage, "candidates_token_count", None) or 0) + int(
        getattr(usage, "thoughts_token_count", None) or 0
    )
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        feedback = getattr(response, "prompt_feedback", None)
        reason = getattr(feedback, "block_reason", None)
        why = f" (prompt blocked: {getattr(reason, 'value', reason)})" if reason else ""
        raise TeacherCallError(f"no candidates in the response{why}", retryable=False)
    cand = candidates[0]
    finish = getattr(cand.finish_reason, "value", cand.finish_reason) or "STOP"
    parts = (cand.content.parts if cand.content is not None else None) or []
    text = "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))
    if finish in BLOCKING_FINISH_REASONS:
        raise TeacherCallError(f"candidate blocked (finishReason={finish})", retryable=False)
    if not text:
        raise TeacherCallError(f"empty candidate (finishReason={finish})", retryable=False)
    return SampleResult(text, FINISH_REASON_NAMES.get(finish, finish.lower()), n_in, n_out)


class GeminiTeacher(AsyncAPITeacher):
    backend = "gemini"

    def __init__(
        self,
        model: str = "gemini-2.5-flash",
        *,
        base_url: str | None = None,
        api_version: str = "v1beta",
        thinking_budget: int | None = None,
        include_thoughts: bool = False,
        batch_mode: bool = False,
        batch_poll_interval: float = 30.0,
        batch_max_wait: float = 24 * 3600.0,
        **kwargs,
    ):
        self.model = model
        self._api_key = api_key_from_env()
        self.base_url = base_url
        self.thinking_budget = thinking_budget
        self.include_thoughts = include_thoughts
        self.batch_mode = batch_mode
        self.batch_poll_interval = float(batch_poll_interval)
        self.batch_max_wait = float(batch_max_wait)
        super().__init__(**kwargs)
        from google import genai
        from google.genai import types

        self._types = types
        http_options = types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=int(self.timeout_s * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),  # no SDK retries: ours are the only ones
        )
        self._client = genai.Client(api_key=self._api_key, http_options=http_options)

    def secrets(self) -> tuple[str, ...]:
        return (self._api_key,)

    def cache_params(self) -> dict[str, Any]:
        return {"thinking_budget": self.thinking_budget, "include_thoughts": self.include_thoughts}

    def response_metadata(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "batch_mode": self.batch_mode}

    def _config(self, request: TeacherRequest, system: str | None):
        t = self._types
        thinking = None
        if self.thinking_budget is not None or self.include_thoughts:
            thinking = t.ThinkingConfig(thinking_budget=self.thinking_budget, include_thoughts=self.include_thoughts)
        return t.GenerateContentConfig(
            system_instruction=system,
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            candidate_count=1,
            thinking_config=thinking,
            automatic_function_calling=t.AutomaticFunctionCallingConfig(disable=True),
        )

    def classify_exception(self, exc: BaseException) -> TeacherCallError:
        from google.genai import errors

        if isinstance(exc, errors.APIError):
            code = int(exc.code or 0)
            msg = scrub(f"HTTP {code} {exc.status or ''}: {exc.message or ''}".strip(), self.secrets())
            if code == 429 or code == 408 or code >= 500:
                resp = getattr(exc, "response", None)
                header = resp.headers.get("retry-after") if resp is not None and hasattr(resp, "headers") else None
                retry_after = parse_retry_after(header) or retry_delay_from_google_details(exc.details)
                return TeacherCallError(msg, retryable=True, retry_after=retry_after)
            return TeacherCallError(msg, retryable=False)
        if isinstance(exc, (json.JSONDecodeError, ValueError)) and "Timeout" not in type(exc).__name__:
            # A 200 whose body is not valid JSON (a truncated or garbled answer): transient.
            return TeacherCallError(f"malformed response ({type(exc).__name__})", retryable=True)
        return super().classify_exception(exc)

    async def _call(self, request: TeacherRequest, sample_index: int) -> SampleResult:
        system, contents = to_gemini_contents(request.messages)
        response = await self._client.aio.models.generate_content(
            model=self.model, contents=contents, config=self._config(request, system)
        )
        return parse_candidate(response)

    async def _aclose(self) -> None:
        await self._client.aio.aclose()

    def close(self) -> None:
        super().close()
        self._client.close()  # the sync HTTP client (used by the Batch API calls)

    # ---------------- Batch API: submit, poll, collect ----------------
    def _dispatch(self, requests, keys, units, on_result, progress) -> None:
        if not self.batch_mode:
            return super()._dispatch(requests, keys, units, on_result, progress)
        fut = asyncio.run_coroutine_threadsafe(self._run_batch(requests, keys, units, on_result), self._loop)
        return fut.result()

    async def _run_batch(self, requests, keys, units: list[Unit], on_result) -> None:
        wanted = {f"{keys[i]}:{s}": (i, s) for i, s in units}
        # First collect jobs an earlier (killed) run submitted for any of these units.
        for job_name, job_units in self.cache.open_batch_jobs(self.backend, self.model) if self.cache else []:
            covered = {f"{k}:{s}" for k, s in job_units}
            if covered & wanted.keys():
                log.info("gemini batch: resuming %s (%d requests)", job_name, len(job_units))
                if not await self._collect_batch(job_name, wanted, on_result):
                    for label in list(covered & wanted.keys()):
                        on_result(wanted.pop(label), f"batch job {job_name} is not finished; re-run to collect it")
        if not wanted:
            return
        t = self._types
        inlined = []
        for label, (i, _sample) in wanted.items():
            system, contents = to_gemini_contents(requests[i].messages)
            inlined.append(
                t.InlinedRequest(
                    model=self.model,
                    contents=contents,
                    config=self._config(requests[i], system),
                    metadata={"key": label},
                )
            )
        job = await self._with_retries_sync(
            lambda: self._client.batches.create(
                model=self.model, src=inlined, config={"display_name": f"undo-{len(inlined)}"}
            )
        )
        if isinstance(job, str):  # submission finally failed: every unit records the error
            for label in list(wanted):
                on_result(wanted.pop(label), f"batch submission failed: {job}")
            return
        if self.cache:
            self.cache.record_batch_job(job.name, self.backend, self.model, [label.rsplit(":", 1) for label in wanted])
        finished = await self._collect_batch(job.name, wanted, on_result)
        for label in list(wanted):  # anything the job did not answer (yet)
            why = "returned no response for this request" if finished else "is not finished; re-run to collect it"
            on_result(wanted.pop(label), f"batch job {job.name} {why}")

    async def _with_retries_sync(self, fn):
        """Run a blocking SDK call with the same retry policy; returns the result or an error string."""
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(fn)
            except Exception as exc:  # noqa: BLE001
                err = self.classify_exception(exc)
            if not err.retryable or attempt >= self.retry.max_retries:
                return scrub(str(err), self.secrets())
            self.ledger.add_retry(self.backend, self.model)
            await asyncio.sleep(self.retry.delay(attempt, err.retry_after, self._rng))
            attempt += 1

    async def _collect_batch(self, job_name: str, wanted: dict[str, Unit], on_result) -> bool:
        """Poll `job_name` until it ends, then hand its answers to `on_result`; False if it did not end."""
        start = time.monotonic()
        while True:
            job = await self._with_retries_sync(lambda: self._client.batches.get(name=job_name))
            if isinstance(job, str):
                log.warning("gemini batch: polling %s failed: %s", job_name, job)
                return False  # left open in the cache; a re-run resumes polling
            state = getattr(job.state, "value", job.state)
            if state in TERMINAL_BATCH_STATES:
                break
            if time.monotonic() - start > self.batch_max_wait:
                log.warning(
                    "gemini batch: %s still %s after %.0fs; a re-run resumes it", job_name, state, self.batch_max_wait
                )
                return False
            await asyncio.sleep(self.batch_poll_interval)
        inlined = (job.dest.inlined_responses if job.dest is not None else None) or []
        for item in inlined:
            label = (item.metadata or {}).get("key")
            if not label:
                continue
            if item.error is not None:
                result: SampleResult | str = scrub(f"batch item error: {item.error}", self.secrets())
            else:
                try:
                    result = parse_candidate(item.response)
                except TeacherCallError as e:
                    result = str(e)
            if label in wanted:
                on_result(wanted.pop(label), result)
            elif self.cache is not None and isinstance(result, SampleResult):
                # Paid for by an earlier run but not asked for now: keep it for the run that will.
                key, sample = label.rsplit(":", 1)
                self.cache.put(key, int(sample), self.backend, self.model, result)
        if state != "JOB_STATE_SUCCEEDED":
            for label in list(wanted):
                on_result(wanted.pop(label), f"batch job {job_name} ended in state {state}")
        if self.cache:
            self.cache.finish_batch_job(job_name, state)
        return True
