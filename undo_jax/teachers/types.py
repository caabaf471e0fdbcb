"""Request/response records shared by every teacher backend (see CONTRACTS.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VALID_ROLES = ("system", "user", "assistant")


@dataclass
class TeacherRequest:
    """One prompt for the teacher.

    `context` is local-only: it is never sent to an API and never part of the cache key
    (the reference teacher reads the task and record from it).
    """

    messages: list[dict[str, str]]
    temperature: float = 0.0
    max_output_tokens: int = 1024
    num_samples: int = 1
    cache_salt: str = ""
    context: dict[str, Any] | None = None

    def validate(self, where: str) -> None:
        """Raise ValueError (one line, naming `where`) on a malformed request."""
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"{where}: messages must be a non-empty list of {{'role','content'}} dicts")
        for j, m in enumerate(self.messages):
            if not isinstance(m, dict) or m.get("role") not in VALID_ROLES or not isinstance(m.get("content"), str):
                raise ValueError(
                    f"{where}: messages[{j}] must be {{'role' in {VALID_ROLES}, 'content': str}}, got {m!r}"
                )
        if not any(m["role"] == "user" for m in self.messages):
            raise ValueError(f"{where}: messages hold no 'user' message")
        if self.num_samples < 1:
            raise ValueError(f"{where}: num_samples must be >= 1, got {self.num_samples}")
        if self.max_output_tokens < 1:
            raise ValueError(f"{where}: max_output_tokens must be >= 1, got {self.max_output_tokens}")
        if self.temperature < 0:
            raise ValueError(f"{where}: temperature must be >= 0, got {self.temperature}")


@dataclass
class TeacherResponse:
    """The teacher's answer to one request.

    `texts[i]`/`finish_reasons[i]` are the completed samples in sample order. When `error` is
    set, the request did not complete: `texts` then holds only the samples that did (maybe none).
    `cached` is True when every sample came from the response cache.
    """

    texts: list[str]
    finish_reasons: list[str]
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    error: str | None = None
    cached: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SampleResult:
    """One completed sample from a backend (internal unit of caching and accounting)."""

    text: str
    finish_reason: str
    input_tokens: int = 0
    output_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


class TeacherCallError(Exception):
    """A failed backend call. `retryable` decides whether the retry loop tries again;
    `retry_after` (seconds) is the server's own hint (Retry-After / RetryInfo), if any."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
