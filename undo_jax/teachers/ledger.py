"""Cost ledger: tokens and calls per (backend, model), priced by flag, summarised at the end of a run."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass


@dataclass
class LedgerEntry:
    calls: int = 0  # samples actually returned by the backend (paid for)
    cache_hits: int = 0  # samples served from the cache (not paid again)
    errors: int = 0  # samples that finally failed
    retries: int = 0  # extra attempts after a retryable failure
    input_tokens: int = 0
    output_tokens: int = 0
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0

    @property
    def cost_usd(self) -> float:
        return (self.input_tokens * self.price_input_per_mtok + self.output_tokens * self.price_output_per_mtok) / 1e6


class CostLedger:
    """Thread-safe accumulator; one ledger may be shared by several teachers of a run."""

    def __init__(self):
        self._entries: dict[tuple[str, str], LedgerEntry] = {}
        self._lock = threading.Lock()

    def entry(self, backend: str, model: str) -> LedgerEntry:
        with self._lock:
            return self._entries.setdefault((backend, model), LedgerEntry())

    def set_prices(self, backend: str, model: str, input_per_mtok: float, output_per_mtok: float) -> None:
        if input_per_mtok < 0 or output_per_mtok < 0:
            raise ValueError(f"ledger: prices must be >= 0, got {input_per_mtok}, {output_per_mtok}")
        e = self.entry(backend, model)
        e.price_input_per_mtok, e.price_output_per_mtok = float(input_per_mtok), float(output_per_mtok)

    def add_call(self, backend: str, model: str, input_tokens: int, output_tokens: int) -> None:
        e = self.entry(backend, model)
        with self._lock:
            e.calls += 1
            e.input_tokens += int(input_tokens)
            e.output_tokens += int(output_tokens)

    def add_cache_hit(self, backend: str, model: str) -> None:
        e = self.entry(backend, model)
        with self._lock:
            e.cache_hits += 1

    def add_error(self, backend: str, model: str) -> None:
        e = self.entry(backend, model)
        with self._lock:
            e.errors += 1

    def add_retry(self, backend: str, model: str) -> None:
        e = self.entry(backend, model)
        with self._lock:
            e.retries += 1

    def to_dict(self) -> dict[str, dict]:
        with self._lock:
            items = sorted(self._entries.items())
            return {f"{b}/{m}": {**asdict(e), "cost_usd": round(e.cost_usd, 6)} for (b, m), e in items}

    @property
    def total_cost_usd(self) -> float:
        with self._lock:
            return sum(e.cost_usd for e in self._entries.values())

    def summary(self) -> str:
        lines = ["teacher cost ledger:"]
        for name, d in self.to_dict().items():
            lines.append(
                f"  {name}: {d['calls']} calls, {d['cache_hits']} cached, {d['errors']} errors, "
                f"{d['retries']} retries, {d['input_tokens']} in / {d['output_tokens']} out tokens, "
                f"${d['cost_usd']:.4f}"
            )
        lines.append(f"  total: ${self.total_cost_usd:.4f}")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        """Write the ledger as JSON atomically (temp file + os.replace)."""
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".ledger.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"entries": self.to_dict(), "total_cost_usd": round(self.total_cost_usd, 6)}, f, indent=2)
        os.replace(tmp, path)
