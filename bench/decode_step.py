"""One jitted decode step (cache donated) of the SmolLM2-135M shape, per layer layout and attention backend.

    python bench/decode_step.py --variants scan:chunked,scan:reference,unrolled:chunked --batch 32

Random init, a cache of --slots slots all valid, writes at slot 100+; median of --steps steps after one
warm-up. One JSON line per variant, with the load average.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="scan:chunked,scan:reference")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from train import SMOLLM2_135M

    from undo_jax.models import CausalLM, ModelConfig

    model = CausalLM(ModelConfig(**SMOLLM2_135M), rngs=nnx.Rngs(0))
    b = args.batch
    for variant in args.variants.split(","):
        layout, backend = variant.split(":")
        model.scan_layers, model.attention = layout == "scan", backend
        graphdef, state = nnx.split(model)

        @functools.partial(jax.jit, donate_argnums=(1,))
        def step(state, cache, tok, pos, index, graphdef=graphdef):
            return nnx.merge(graphdef, state).decode_step(tok, pos, cache, index)

        cache = model.init_cache(b, args.slots)
        cache = cache._replace(valid=jnp.ones((b, args.slots), bool))
        tok, pos = jnp.ones((b, 1), jnp.int32), jnp.full((b, 1), 100, jnp.int32)
        _, cache = step(state, cache, tok, pos, jnp.int32(100))
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            logits, cache = step(state, cache, tok, pos, jnp.int32(101 + i))
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"variant": variant, "batch": b, "slots": args.slots,
                          "step_ms": round(statistics.median(times) * 1e3, 1), "load_avg": os.getloadavg()[0]}),
              flush=True)


if __name__ == "__main__":
    main()
