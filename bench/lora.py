"""Memory and step time of full fine-tuning vs LoRA vs QLoRA (int8, nf4) on a Qwen2.5-1.5B-shaped random model.

    nice -n 5 python bench/lora.py                 # Qwen2.5-1.5B shape, micro-batch 1 x 512, rank 16, all 7 targets
    python bench/lora.py --tiny                    # a seconds-long smoke run

Each variant runs in its own process (its own peak RSS): the trainer's jitted single step
(`make_step_functions` with the frozen base as an argument, exactly what `train` runs), compiled once,
then timed over --steps steps. Every variant is first compiled from abstract shapes only, and XLA's
memory analysis of that step (arguments + temporaries: params, optimizer state, frozen base, activations)
says what it needs; a variant whose need exceeds --limit-gib is reported and not run (full fine-tuning
in float32 with Adam needs 16 bytes per parameter before activations: it is not run to an OOM on a
shared machine). LoRA keeps the base in bfloat16, QLoRA in int8 (per-channel) or NF4 (blocks of 64);
embeddings and norms stay bfloat16 in all three; the adapters and their Adam moments are float32.
JSON lines: the load average, then one line per variant, then the ratios against 24 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=True,
                   max_position_embeddings=32768)
TINY = dict(QWEN25_1_5B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
VARIANTS = ("full", "lora", "qlora_int8", "qlora_nf4")
GIB = 1024 ** 3


def _batch(cfg, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (1, seq)).astype(np.int32)
    mask = np.zeros((1, seq), np.float32)
    mask[:, seq // 4:-1] = 1.0
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
            "segment_ids": np.ones((1, seq), np.int32), "positions": np.arange(seq, dtype=np.int32)[None]}


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig
    from undo_jax.models.lora import LoRASettings, apply_lora
    from undo_jax.sharding import make_mesh
    from undo_jax.train import TrainConfig
    from undo_jax.train.step import make_optimizer, make_step_functions
    from undo_jax.train.trainer import functional_view

    cfg = ModelConfig(**(TINY if args.tiny else QWEN25_1_5B))
    variant = args.variant
    base_dtype = {"full": None, "lora": "bfloat16", "qlora_int8": "int8", "qlora_nf4": "nf4"}[variant]
    config = TrainConfig(lr=1e-4, batch_size=1, micro_batch=1, max_length=args.seq, remat=args.remat,
                         loss_chunk=args.loss_chunk, progress=False)
    tx = make_optimizer(config, 100)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg, args.seq).items()}
    param_dtype = jnp.float32 if variant == "full" else jnp.bfloat16
    settings = None if base_dtype is None else LoRASettings(args.rank, 2.0 * args.rank, base_dtype=base_dtype)

    def build():
        model = CausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)
        return model if settings is None else apply_lora(model, settings, seed=0)

    # What the step needs, from shapes only (nothing allocated).
    mesh = make_mesh(devices=jax.devices()[:1])
    abstract_model = nnx.eval_shape(build)
    graphdef, params, frozen, _, _ = functional_view(abstract_model, "float32", mesh)
    *_, single = make_step_functions(graphdef, tx, lambda s: config.lr, config)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(single, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(_abstract(state), _abstract(batch), _abstract(frozen)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    trainable = sum(x.size for x in jax.tree.leaves(params))
    total = trainable + sum(x.size for x in jax.tree.leaves(frozen))
    need = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)
    result = {"variant": variant, "base_dtype": base_dtype or "float32 (trained)",
              "rank": args.rank if settings else None, "seq": args.seq, "remat": args.remat,
              "trainable_params": int(trainable), "stored_values": int(total),
              "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
              "need_bytes": need, "need_gib": round(need / GIB, 2), "compile_s": round(compile_s, 1)}
    if variant == "full":
        result["analytic_16_bytes_per_param_gib"] = round(16 * trainable / GIB, 2)
    result["executed"] = need <= args.limit_gib * GIB
    if result["executed"]:
        model = build()
        graphdef, params, frozen, _, _ = functional_view(model, "float32", mesh)
        del model
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, frozen)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        result.update(s_per_step=round(statistics.median(times), 2), loss=round(float(metrics["loss"]), 4))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_rss_gib"] = round(result["peak_rss_bytes"] / GIB, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loss-chunk", type=int, default=2048)
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--limit-gib", type=float, default=14.0, help="run a variant only if XLA says it needs less")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: the worker process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)), flush=True)
        return
    print(json.dumps({"load": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    results = {}
    for variant in args.variants.split(","):
        argv = [sys.executable, __file__, f"--variant={variant}", *sys.argv[1:]]
        out = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if out.returncode:
            print(json.dumps({"variant": variant, "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)
    budget = 24 * GIB
    print(json.dumps({"load_after": os.getloadavg(),
                      **{f"{v}_need_over_24gib": round(r["need_bytes"] / budget, 2) for v, r in results.items()}}),
          flush=True)


if __name__ == "__main__":
    main()
