"""Compile seconds vs depth: SmolLM2-135M (30 layers) and the same model cut to 2 layers, scanned vs unrolled.

    python bench/compile.py                     # train step 8x512 and sampler prefill+decode, batch 32
    python bench/compile.py --train-shape 1x128 --sample-batch 8

Compile only (abstract parameters: nothing is allocated or run). Programs: `train` is the trainer's
gradient function for one micro-batch (forward, chunked-vocabulary loss, backward); `sample` is the
sampler's prefill plus its on-device decode loop (`undo_jax.sampling.engine`). Each program and model is
compiled --repeats times (caches cleared: a fresh trace and compile each time; the minimum is reported),
in one process. JSON lines: one per (program, layers, scanned), then one summary per (program, scanned)
with `compile_ratio_30_over_2`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))


def _abstract_model(cfg, layers: int, scan: bool, attention: str):
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig

    config = ModelConfig(**dict(cfg, num_hidden_layers=layers))
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), attention=attention, scan_layers=scan))


def compile_train(model, batch: int, seq: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from undo_jax.train import TrainConfig
    from undo_jax.train.step import make_optimizer, make_step_functions
    from undo_jax.train.trainer import compute_graphdef

    jax.clear_caches()  # a fresh compile, not a cached executable
    config = TrainConfig(micro_batch=batch, batch_size=batch, max_length=seq, progress=False)
    graphdef, _, _ = compute_graphdef(model, "float32")
    params = nnx.state(model, nnx.Param).to_pure_dict()
    first_grads, *_ = make_step_functions(graphdef, make_optimizer(config, 10), lambda s: config.lr, config)
    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    mb = {"tokens": ints, "targets": ints, "loss_mask": jax.ShapeDtypeStruct((batch, seq), bool),
          "segment_ids": ints, "positions": ints}
    t0 = time.perf_counter()
    jax.jit(first_grads).lower(params, mb).compile()
    return time.perf_counter() - t0


def compile_sample(model, batch: int, prompt: int, new: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from undo_jax.sampling import engine
    from undo_jax.sampling.sample import SamplingSettings

    jax.clear_caches()  # the engine's jitted functions would otherwise return their cached executables
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(batch, prompt + new))

    def s(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype)

    settings = engine.DecodeSettings(new, prompt, SamplingSettings(0.0, 0, 1.0))
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    engine.prefill.lower(graphdef, state, cache, s((batch, prompt)), s((batch, prompt)),
                         s((batch, prompt), bool)).compile()
    engine.decode.lower(graphdef, state, cache, s((batch, model.config.vocab_size), jnp.float32), s((batch,)),
                        s((batch,), bool), key, s((batch, 2)), s((4,)), s((1, 4)), settings=settings).compile()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-shape", default="8x512", help="micro-batch BxT of the train step")
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--programs", default="train,sample")
    parser.add_argument("--layouts", default="scanned,unrolled")
    parser.add_argument("--repeats", type=int, default=2, help="compiles per variant; the minimum is reported")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from train import SMOLLM2_135M

    batch, seq = map(int, args.train_shape.split("x"))
    times = {}
    for program in args.programs.split(","):
        for scan in [layout == "scanned" for layout in args.layouts.split(",")]:
            for layers in (2, SMOLLM2_135M["num_hidden_layers"]):
                model = _abstract_model(SMOLLM2_135M, layers, scan, args.attention)
                if program == "train":
                    runs = [compile_train(model, batch, seq) for _ in range(args.repeats)]
                    shape = {"batch": batch, "seq": seq}
                else:
                    runs = [compile_sample(model, args.sample_batch, args.prompt, args.new)
                            for _ in range(args.repeats)]
                    shape = {"batch": args.sample_batch, "prompt": args.prompt, "new": args.new}
                seconds = min(runs)
                times[program, scan, layers] = seconds
                print(json.dumps({"program": program, "layers": layers, "scanned": scan, "attention": args.attention,
                                  **shape, "compile_s": round(seconds, 2),
                                  "compile_runs_s": [round(r, 2) for r in runs], "load_avg": os.getloadavg()[0]}),
                      flush=True)
            deep = times[program, scan, SMOLLM2_135M["num_hidden_layers"]]
            print(json.dumps({"program": program, "scanned": scan, "summary": True,
                              "compile_ratio_30_over_2": round(deep / times[program, scan, 2], 2)}), flush=True)


if __name__ == "__main__":
    main()
