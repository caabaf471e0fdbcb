"""Step time and memory of rationale SFT vs SFT + logit distillation (cached teacher targets), same batch.

    python bench/distill.py                  # SmolLM2-135M shape, fp32, one micro-batch of 4 x 256, k = 32
    python bench/distill.py --tiny           # a seconds-long smoke run

Each variant runs in its own process (peak RSS per variant): the trainer's jitted single step
(`make_step_functions`, the exact step `train` runs) on one packed micro-batch, compiled once, then timed
over --steps steps. The KD variant's batch carries random sparse teacher targets of the stored shape
(top-k log-probs, ids, tail), so it measures the step, not the teacher pass (which runs once per example
and is cached). JSON lines: per variant the median s/step, tokens/s, XLA temp bytes of the compiled step
and peak RSS; then `ratio_logit_kd_over_sft` (median step time).

The on-policy variant times what a step drawn on-policy costs (`undo_jax.train.on_policy.student_samples`, then
the same KD step): the student samples the second half of every row (temperature 1, --seq / 2 tokens at most),
a teacher of the same shape (other random weights) scores the samples, then the step runs on them. It reports
the three parts and `ratio_on_policy_over_sft`. With --on-policy-fraction f, a run's mean step costs about
(1 - f) * logit_kd + f * on_policy.
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

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048)
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig
    from undo_jax.train import TrainConfig
    from undo_jax.train.step import make_optimizer, make_step_functions

    cfg = ModelConfig(**(TINY if args.tiny else SMOLLM2_135M))
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape).astype(np.float32)),
                          abstract.to_pure_dict())
    config = TrainConfig(lr=1e-5, batch_size=args.rows, micro_batch=args.rows, max_length=args.seq,
                         loss_chunk=args.loss_chunk, remat=args.remat, kd_alpha=0.5, kd_temperature=1.0)
    tx = make_optimizer(config, 100)
    *_, single = make_step_functions(graphdef, tx, lambda s: config.lr, config)
    r, t = args.rows, args.seq
    tokens = rng.integers(3, cfg.vocab_size, (r, t)).astype(np.int32)
    mask = np.zeros((r, t), np.float32)
    mask[:, t // 2:-1] = 1.0  # first half prompt, second half completion
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
             "segment_ids": np.ones((r, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (r, 1))}
    if args.variant == "logit_kd":
        k = args.top_k
        logp = np.log(rng.dirichlet(np.ones(k + 1), size=(r, t))).astype(np.float32)
        batch.update(top_logp=logp[..., :k], log_tail=logp[..., k], ce_mask=mask,
                     top_ids=rng.integers(0, cfg.vocab_size, (r, t, k)).astype(np.int32))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(single, donate_argnums=0)
    if args.variant == "on_policy":
        return on_policy_worker(args, cfg, graphdef, state, step, tokens, config, rng)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"variant": args.variant, "rows": r, "seq": t, "top_k": args.top_k if args.variant == "logit_kd" else None,
            "remat": args.remat, "s_per_step": round(median, 3), "tokens_per_s": round(r * t / median, 1),
            "temp_bytes": int(temp), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": float(metrics["loss"])}


def bench_tokenizer(tiny: bool):
    """A real tokenizer for the sampler's end tokens and decoding: the tiny character one, or SmolLM2's."""
    if tiny:
        from tests.train.helpers import tiny_tokenizer

        return tiny_tokenizer()
    from undo_jax.assets import smollm2_gguf_path
    from undo_jax.models.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(smollm2_gguf_path())


def on_policy_worker(args, cfg, graphdef, state, step, tokens, config, rng) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from undo_jax.train import data as data_lib
    from undo_jax.train.on_policy import OnPolicyTeacher, student_samples

    r, t = args.rows, args.seq
    config = dataclasses.replace(config, on_policy_fraction=1.0, on_policy_temperature=1.0,
                                 on_policy_max_new_tokens=t // 2, packing=False)
    teacher_params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape).astype(np.float32)),
                                  state["params"])
    teacher = OnPolicyTeacher(nnx.merge(graphdef, teacher_params), bench_tokenizer(args.tiny), args.top_k,
                              batch_size=r)
    prompts = [data_lib.TokenizedExample(tokens[i], t // 2) for i in range(r)]
    parts = {"sample_and_score_s": [], "step_s": [], "s_per_step": []}
    temp = None
    for i in range(args.steps + 1):  # the first round compiles
        start = time.perf_counter()
        student = nnx.merge(graphdef, state["params"])
        seqs, info = student_samples(student, teacher, prompts, config, i)
        sampled = time.perf_counter()
        (batch,) = data_lib.step_micro_batches(seqs, config)
        batch = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
        if temp is None:
            temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        end = time.perf_counter()
        if i:
            parts["sample_and_score_s"].append(sampled - start)
            parts["step_s"].append(end - sampled)
            parts["s_per_step"].append(end - start)
    median = {k: round(statistics.median(v), 3) for k, v in parts.items()}
    return {"variant": "on_policy", "rows": r, "seq": t, "top_k": args.top_k, "remat": args.remat, **median,
            "sampled_tokens_last": info["sampled_tokens"], "tokens_per_s": round(r * t / median["s_per_step"], 1),
            "temp_bytes": int(temp), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loss-chunk", type=int, default=512)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: the worker process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)), flush=True)
        return
    print(json.dumps({"load": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    results = {}
    for variant in ("sft", "logit_kd", "on_policy"):
        argv = [sys.executable, __file__, f"--variant={variant}", *sys.argv[1:]]
        out = subprocess.run(argv, capture_output=True, text=True, check=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)
    print(json.dumps({"ratio_logit_kd_over_sft": round(results["logit_kd"]["s_per_step"] /
                                                       results["sft"]["s_per_step"], 3),
                      "ratio_on_policy_over_sft": round(results["on_policy"]["s_per_step"] /
                                                        results["sft"]["s_per_step"], 3),
                      "temp_ratio_logit_kd_over_sft": round(results["logit_kd"]["temp_bytes"] /
                                                            max(results["sft"]["temp_bytes"], 1), 3)}), flush=True)


if __name__ == "__main__":
    main()
