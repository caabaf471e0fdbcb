"""Generation speed on an accelerator: a Qwen2.5-0.5B-shaped random CausalLM in bf16.

Self-contained (no checkpoint, no tokenizer files): a random model with Qwen2.5-0.5B's shapes and a
small byte-level BPE tokenizer trained in-process (prompt ids only need to be valid ids). Runs
`generate` greedy with early stop off at batch 1 and 64, 128 new tokens, and prints JSON lines with
tokens/s, the decode step time ((t[N new tokens] - t[1 new token]) / (N - 1), warm medians), and
the fraction of HBM bandwidth reached:

    bytes per step = parameter bytes (every weight is read once per step; the tied embedding is
                     read whole by the output projection) + KV cache bytes read per step
    fraction       = bytes per step / step time / peak (default 4.8e12 B/s, an H200)

Two KV figures: `kv_bytes_read` is what the decode step reads (the whole preallocated cache of
prompt bucket + max_new_tokens slots), `kv_bytes_useful` only the slots holding real context.

    python bench/gpu_sampling.py            # on the GPU
    python bench/gpu_sampling.py --tiny     # a tiny model, on any backend (CPU check of the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from undo_jax.models import CausalLM, ModelConfig  # noqa: E402
from undo_jax.sampling import generate, kv_cache_bytes, prompt_bucket  # noqa: E402
from undo_jax.sampling.generate import render_prompts  # noqa: E402

QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                  rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                  attention_bias=True, rms_norm_eps=1e-6)
TINY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SENTENCES = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs 100 dollars. Betty has only half of the money.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write?",
    "Mark has a garden with flowers. He planted plants of three different colors in it.",
]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def toy_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def prompts_for(batch: int) -> list[str]:
    # Different lengths (1 to 3 sentences), so the batch is left padded as in real use.
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 3)) for i in range(batch)]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model (checks the script on CPU)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="auto", help="attention backend (undo_jax.models.attention)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hbm-peak", type=float, default=4.8e12, help="bytes/s (H200: 4.8e12)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    config = ModelConfig(**(TINY if args.tiny else QWEN25_05B))
    t = time.perf_counter()
    model = nnx.jit(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                     attention=args.attention))()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not config.tie_word_embeddings:  # an untied input embedding is only gathered, not read whole
        param_bytes -= model.embed_tokens[...].nbytes
    tokenizer = toy_tokenizer()
    device = jax.devices()[0]
    emit({"kind": "env", "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "model": "tiny" if args.tiny else "Qwen2.5-0.5B-shaped (random)", "dtype": args.dtype,
          "params": config.num_params(), "param_bytes": param_bytes, "init_s": time.perf_counter() - t,
          "hbm_peak_bytes_per_s": args.hbm_peak})

    n_new = args.new_tokens
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompts_for(batch)
        lengths = [len(ids) for ids in render_prompts(tokenizer, prompts)]

        def run(n, prompts=prompts, batch=batch):
            out = generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=batch, ignore_eos=True)
            assert all(len(c[0].token_ids) == n for c in out)

        t = time.perf_counter()
        run(n_new)
        first_call = time.perf_counter() - t
        full = median_time(lambda: run(n_new), args.repeats)
        run(1)
        prefill_only = median_time(lambda: run(1), args.repeats)
        step = (full - prefill_only) / (n_new - 1)
        bucket = prompt_bucket(max(lengths))
        kv_read = kv_cache_bytes(config, batch, bucket + n_new, dtype)  # every slot, every step
        mean_context = sum(lengths) / batch + n_new / 2
        kv_useful = kv_cache_bytes(config, batch, 1, dtype) * mean_context
        emit({"kind": "run", "batch": batch, "new_tokens": n_new, "prompt_bucket": bucket,
              "seconds_median": full, "tokens_per_s": batch * n_new / full, "decode_step_ms": step * 1e3,
              "decode_tokens_per_s": batch / step, "prefill_and_overhead_s": prefill_only,
              "compile_s": max(first_call - full, 0.0), "param_bytes": param_bytes, "kv_bytes_read": kv_read,
              "kv_bytes_useful": kv_useful,
              "hbm_fraction": (param_bytes + kv_read) / step / args.hbm_peak,
              "hbm_fraction_useful": (param_bytes + kv_useful) / step / args.hbm_peak})


if __name__ == "__main__":
    main()
