"""Run one teacher batch against a loopback server; used as a subprocess by the kill-and-resume tests.

    python tests/teachers/drive_teacher.py --backend gemini --base-url URL --cache PATH --n 40

The API key comes from the environment (GEMINI_API_KEY / OPENAI_API_KEY), as in real use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from undo_jax.teachers import TeacherRequest, make_teacher  # noqa: E402


def batch_requests(n: int) -> list[TeacherRequest]:
    return [
        TeacherRequest([{"role": "system", "content": "You are a teacher."}, {"role": "user", "content": f"q{k}"}])
        for k in range(n)
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args()
    teacher = make_teacher(
        a.backend,
        model="loop-model",
        base_url=a.base_url,
        cache_path=a.cache,
        concurrency=a.concurrency,
        retry_base_delay=0.01,
        timeout_s=10,
    )
    responses = teacher.generate(batch_requests(a.n))
    teacher.close()
    print(json.dumps({"ok": sum(r.ok for r in responses), "cached": sum(r.cached for r in responses)}))


if __name__ == "__main__":
    main()
