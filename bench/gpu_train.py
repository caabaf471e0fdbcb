"""GPU training throughput of undo_jax's `train` on a Qwen2.5-0.5B-shaped random model, bf16 compute.

    python bench/gpu_train.py                      # on the accelerator: batch 8 x 1024, 5 timed steps
    python bench/gpu_train.py --tiny               # CPU smoke run (seconds)

Prints one JSON object: median step time, tokens/s, model TFLOP/s and MFU against the dense bf16 peak
(default 989 TFLOP/s: NVIDIA's H100/H200 SXM dense BF16 tensor-core figure, without sparsity), plus MFU
against a bf16 matmul peak measured in the same run. Params and Adam state stay float32; only the
compute runs in bfloat16. Model FLOPs per token: 6 * matmul params (incl. the output projection) +
12 * layers * heads * head_dim * T (full attention scores, as computed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=True,
                  max_position_embeddings=32768)
TINY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
H200_DENSE_BF16_TFLOPS = 989.0


def model_flops_per_step(cfg: dict, batch: int, seq: int) -> float:
    d, f, h, kv, hd, layers, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                  cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"],
                                  cfg["vocab_size"])
    matmul_params = layers * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f) + d * v
    return float((6 * matmul_params + 12 * layers * h * hd * seq) * batch * seq)


def measured_bf16_matmul_peak(n: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).sum())
    mm(a, a).block_until_ready()
    best = 0.0
    for _ in range(10):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8; tiny 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warmup (compile) step")
    parser.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    parser.add_argument("--attention", default="auto", help="attention backend (undo_jax.models.attention)")
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--peak-tflops", type=float, default=H200_DENSE_BF16_TFLOPS)
    args = parser.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig
    from undo_jax.sharding import make_mesh
    from undo_jax.train import TrainConfig, train_tokenized
    from undo_jax.train.data import TokenizedExample

    cfg = TINY if args.tiny else QWEN25_05B
    batch = args.batch or (4 if args.tiny else 8)
    seq = args.seq or (64 if args.tiny else 1024)
    device = jax.devices()[0]
    measured_peak = measured_bf16_matmul_peak(256 if args.tiny else 8192)

    model = CausalLM(ModelConfig(**cfg), rngs=nnx.Rngs(0), attention=args.attention)
    rng = np.random.default_rng(0)
    seqs = [TokenizedExample(rng.integers(3, cfg["vocab_size"], size=seq).astype(np.int32), seq // 2)
            for _ in range(batch)]
    # One step per epoch, so the epoch callback sees every step.
    config = TrainConfig(lr=1e-5, epochs=args.steps + 1, batch_size=batch, micro_batch=batch, max_length=seq,
                         warmup_ratio=0.0, schedule="constant", compute_dtype="bfloat16", remat=args.remat,
                         loss_chunk=args.loss_chunk, progress=False)
    log_path = Path(tempfile.mkdtemp()) / "train_log.jsonl"
    t0 = time.perf_counter()
    train_tokenized(model, seqs, config, mesh=make_mesh(devices=[device]), log_path=log_path)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in log_path.read_text().splitlines()[1:]]
    times = [r["step_time_s"] for r in records[1:]]
    step_s = statistics.median(times)
    flops = model_flops_per_step(cfg, batch, seq)
    memory = {}
    try:
        stats = device.memory_stats() or {}
        memory = {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit")}
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        pass
    print(json.dumps({
        "device": str(device.device_kind), "platform": device.platform,
        "model": "tiny" if args.tiny else "Qwen2.5-0.5B shape (random init)", "batch": batch, "seq": seq,
        "remat": args.remat, "attention": args.attention, "compute_dtype": "bfloat16", "params_dtype": "float32",
        "first_step_s": records[0]["step_time_s"], "median_step_s": step_s, "step_times_s": times,
        "tokens_per_s": batch * seq / step_s, "model_tflop_per_step": flops / 1e12,
        "model_tflops_per_s": flops / step_s / 1e12,
        "peak_tflops_assumed": args.peak_tflops, "mfu_vs_assumed_peak": flops / step_s / (args.peak_tflops * 1e12),
        "measured_bf16_matmul_tflops": measured_peak / 1e12, "mfu_vs_measured_matmul": flops / step_s / measured_peak,
        "final_loss": records[-1]["loss"], "total_wall_s": wall, "memory": memory,
    }, indent=1))


if __name__ == "__main__":
    main()
