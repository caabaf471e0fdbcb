"""Teacher throughput against a loopback server with fixed latency: concurrent vs sequential.

    python bench/teachers.py [--backend gemini|openai] [--requests 200] [--latency 0.1] [--concurrency 16]

Prints one JSON line. The real google-genai client (or the OpenAI-compatible HTTP client) talks
to an in-process server on 127.0.0.1; the cache is off so every request is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from undo_jax.teachers import TeacherRequest, make_teacher  # noqa: E402
from undo_jax.testing.servers import LoopbackServer  # noqa: E402

BENCH_KEY = "bench-key-not-a-secret"


def run_once(backend: str, base_url: str, n: int, concurrency: int, tag: str) -> float:
    teacher = make_teacher(backend, model="bench-model", base_url=base_url, concurrency=concurrency, timeout_s=30)
    requests = [TeacherRequest([{"role": "user", "content": f"{tag}-{k}"}]) for k in range(n)]
    start = time.perf_counter()
    out = teacher.generate(requests)
    elapsed = time.perf_counter() - start
    teacher.close()
    failed = [r.error for r in out if r.error]
    if failed:
        raise RuntimeError(f"bench: {len(failed)} requests failed, e.g. {failed[0]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["gemini", "openai"], default="gemini")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--latency", type=float, default=0.1, help="server seconds per request")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    os.environ.setdefault("GEMINI_API_KEY" if a.backend == "gemini" else "OPENAI_API_KEY", BENCH_KEY)
    with LoopbackServer(a.backend, latency=a.latency) as server:
        seq = [run_once(a.backend, server.base_url, a.requests, 1, f"s{r}") for r in range(a.repeats)]
        par = [run_once(a.backend, server.base_url, a.requests, a.concurrency, f"c{r}") for r in range(a.repeats)]
        sent = server.stats()["total"]
    seq_m, par_m = statistics.median(seq), statistics.median(par)
    print(
        json.dumps(
            {
                "bench": "teachers",
                "backend": a.backend,
                "requests": a.requests,
                "server_latency_s": a.latency,
                "concurrency": a.concurrency,
                "repeats": a.repeats,
                "sequential_s": [round(x, 3) for x in seq],
                "concurrent_s": [round(x, 3) for x in par],
                "sequential_median_s": round(seq_m, 3),
                "concurrent_median_s": round(par_m, 3),
                "speedup_median": round(seq_m / par_m, 2),
                "concurrent_req_per_s": round(a.requests / par_m, 1),
                "requests_sent": sent,
            }
        )
    )


if __name__ == "__main__":
    main()
