"""Teacher for any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, Gemini's
OpenAI endpoint), over plain async HTTP with the shared retry and rate-limit machinery."""

from __future__ import annotations

import json
import os
from typing import Any

from undo_jax.teachers.base import AsyncAPITeacher
from undo_jax.teachers.limits import parse_retry_after, scrub
from undo_jax.teachers.types import SampleResult, TeacherCallError, TeacherRequest

try:  # httpx2 is the fork google-genai depends on; plain httpx works the same
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

BLOCKING_FINISH_REASONS = {"content_filter"}


def parse_chat_completion(payload: Any) -> SampleResult:
    """A chat.completion JSON body -> SampleResult; filtered or empty answers raise non-retryable errors."""
    if not isinstance(payload, dict):
        raise TeacherCallError(f"malformed response (top level is {type(payload).__name__})", retryable=True)
    usage = payload.get("usage") or {}
    choices = payload.get("choices")
    if not choices:
        raise TeacherCallError("no choices in the response", retryable=False)
    choice = choices[0]
    finish = choice.get("finish_reason") or "stop"
    content = (choice.get("message") or {}).get("content")
    if finish in BLOCKING_FINISH_REASONS:
        raise TeacherCallError(f"choice blocked (finish_reason={finish})", retryable=False)
    if not content:
        raise TeacherCallError(f"empty choice (finish_reason={finish})", retryable=False)
    return SampleResult(content, finish, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class OpenAITeacher(AsyncAPITeacher):
    backend = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key_env: str = "OPENAI_API_KEY",
        extra_body: dict[str, Any] | None = None,
        **kwargs,
    ):
        if not model:
            raise ValueError("openai teacher: a model name is required (the server's model id)")
        self.model = model
        self.base_url = base_url.rstrip("/")
        # Local servers (vLLM, Ollama) need no key; a missing key simply sends no Authorization header.
        self._api_key = os.environ.get(api_key_env) or None
        self.extra_body = dict(extra_body or {})
        super().__init__(**kwargs)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._headers = headers
        self._client: httpx.AsyncClient | None = None

    def secrets(self) -> tuple[str, ...]:
        return (self._api_key,) if self._api_key else ()

    def cache_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "extra_body": self.extra_body}

    def classify_exception(self, exc: BaseException) -> TeacherCallError:
        if isinstance(exc, json.JSONDecodeError):
            return TeacherCallError("malformed response (JSONDecodeError)", retryable=True)
        return super().classify_exception(exc)

    async def _call(self, request: TeacherRequest, sample_index: int) -> SampleResult:
        if self._client is None:  # created on the teacher's own event loop
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=self._headers)
        body = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_output_tokens,
            "n": 1,
            **self.extra_body,
        }
        resp = await self._client.post(f"{self.base_url}/chat/completions", json=body)
        if resp.status_code != 200:
            text = scrub(resp.text[:300], self.secrets())
            retryable = resp.status_code in (408, 409, 429) or resp.status_code >= 500
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if retry_after is None and resp.headers.get("retry-after-ms"):
                retry_after = (parse_retry_after(resp.headers["retry-after-ms"]) or 0) / 1000.0
            raise TeacherCallError(f"HTTP {resp.status_code}: {text}", retryable=retryable, retry_after=retry_after)
        return parse_chat_completion(json.loads(resp.text))

    async def _aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
