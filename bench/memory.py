"""Memory of the SmolLM2-135M training step: XLA temporaries and peak RSS per attention backend and remat.

    python bench/memory.py                                  # 8x512 and 4x1024; reference/chunked; remat off/on
    python bench/memory.py --configs chunked:nothing_saveable:8x512 --execute-limit-gb 8

Each config runs in its own subprocess (so peak RSS is that config's), one at a time. A worker builds
the model with random weights, compiles the trainer's gradient function for one micro-batch
(`undo_jax.train.step.make_step_functions`: forward, chunked-vocabulary loss, backward) and reports
`compiled.memory_analysis()` (temp_bytes: XLA temporaries; argument/output bytes: params, batch,
gradients). It then runs the step once, unless its temporaries exceed --execute-limit-gb (the 8x512
reference step needs ~15 GB: too much for a shared machine), and reports peak RSS and the loss.
One JSON line per config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

DEFAULT_CONFIGS = [f"{backend}:{remat}:{shape}" for shape in ("8x512", "4x1024")
                   for backend in ("reference", "chunked") for remat in ("none", "nothing_saveable")]


def worker(backend: str, remat: str, batch: int, seq: int, execute_limit: float, scan: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from train import SMOLLM2_135M, batch_arrays, peak_rss_mib

    from undo_jax.models import CausalLM, ModelConfig
    from undo_jax.train import TrainConfig
    from undo_jax.train.step import make_optimizer, make_step_functions
    from undo_jax.train.trainer import compute_graphdef

    cfg = ModelConfig(**SMOLLM2_135M)
    model = CausalLM(cfg, rngs=nnx.Rngs(0), attention=backend, scan_layers=scan)
    config = TrainConfig(micro_batch=batch, batch_size=batch, max_length=seq, remat=remat != "none",
                         remat_policy=remat if remat != "none" else "nothing_saveable", progress=False)
    graphdef, params, _ = compute_graphdef(model, "float32")
    params = nnx.state(model, nnx.Param).to_pure_dict()
    del model
    tx = make_optimizer(config, 10)
    first_grads, *_ = make_step_functions(graphdef, tx, lambda s: config.lr, config)
    ids, prompt_len = batch_arrays(SMOLLM2_135M, batch, seq)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, prompt_len - 1:-1] = True
    mb = {"tokens": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": loss_mask,
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}
    mb = {k: jnp.asarray(v) for k, v in mb.items()}
    t0 = time.perf_counter()
    compiled = jax.jit(first_grads).lower(params, mb).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    result = {"backend": backend, "remat": remat, "batch": batch, "seq": seq, "scanned": scan,
              "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
              "output_bytes": int(mem.output_size_in_bytes), "compile_s": round(compile_s, 2)}
    result["executed"] = mem.temp_size_in_bytes <= execute_limit * 1024**3
    if result["executed"]:
        t0 = time.perf_counter()
        acc = jax.block_until_ready(compiled(params, mb))
        result["step_s"] = round(time.perf_counter() - t0, 2)
        result["loss"] = float(acc["loss_sum"] / acc["count"])
    result["peak_rss_bytes"] = int(peak_rss_mib() * 1024 * 1024)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated backend:remat_policy:BxT (remat_policy 'none' = no remat)")
    parser.add_argument("--execute-limit-gb", type=float, default=8.0,
                        help="run the compiled step only when its temporaries are at most this many GB")
    parser.add_argument("--unrolled", action="store_true", help="unrolled layers instead of lax.scan")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, remat, shape = args.worker.split(":")
        batch, seq = map(int, shape.split("x"))
        print(json.dumps(worker(backend, remat, batch, seq, args.execute_limit_gb, not args.unrolled)), flush=True)
        return
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for spec in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", spec, "--execute-limit-gb", str(args.execute_limit_gb)]
        cmd += ["--unrolled"] if args.unrolled else []
        out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(json.dumps({"config": spec, "error": f"worker exited {out.returncode}",
                              "stderr_tail": out.stderr[-500:]}), flush=True)
            continue
        record = json.loads(lines[-1])
        record["load_avg"] = os.getloadavg()[0]
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
