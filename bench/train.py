"""Training throughput: undo_jax's `train` vs a hand-written PyTorch loop on the same model shape and batch.

    python bench/train.py                      # SmolLM2-135M shape, fp32, batch 8 x 512, 3 timed steps each
    python bench/train.py --modes fp32,remat,bf16 --steps 3
    python bench/train.py --tiny               # a seconds-long smoke run

Each framework runs in its own worker process (so peak RSS is per framework), one at a time (two 135M
trainings at once do not fit a small shared machine); PyTorch runs before and after the undo_jax modes so
its median spans the same background load. Both accumulate gradients over --micro-batch rows to the same
global batch (XLA:CPU keeps ~0.4 GB per layer of attention temporaries at 8 x 512). Reported per mode:
median seconds/step and tokens/s, the undo_jax/PyTorch tokens/s ratio, peak RSS, and MFU against the
fp32 matmul peak measured in the same run (best of both frameworks on a square matmul).
Model FLOPs per token: 6 * (matmul params incl. the output projection) + 12 * layers * heads * head_dim * T
(full, unmasked attention scores, which is what both implementations compute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2)
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def model_flops_per_step(cfg: dict, batch: int, seq: int) -> float:
    d, f, h, kv, hd, layers, v = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                                  cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"],
                                  cfg["vocab_size"])
    matmul_params = layers * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f) + d * v
    per_token = 6 * matmul_params + 12 * layers * h * hd * seq
    return float(per_token * batch * seq)


def batch_arrays(cfg: dict, batch: int, seq: int, seed: int = 0):
    """Random token rows; the first half of each row is the prompt, the second half the completion."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg["vocab_size"], size=(batch, seq)).astype(np.int32)
    return ids, seq // 2


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------- workers
def _send(msg: dict):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _wait_go() -> bool:
    line = sys.stdin.readline()
    return line.strip() == "go"


def worker_torch(args, cfg):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in cfg.items() if k != "model_type"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float().train()
    if args.torch_remat:
        model.gradient_checkpointing_enable()
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or n.endswith("bias")]
    decay = [p for n, p in model.named_parameters() if not ("norm" in n or n.endswith("bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-5)
    ids, prompt_len = batch_arrays(cfg, args.batch, args.seq)
    input_ids = torch.from_numpy(ids).long()
    targets = torch.roll(input_ids, -1, dims=1)
    mask = torch.zeros_like(input_ids, dtype=torch.float32)
    mask[:, prompt_len - 1: -1] = 1.0

    # Matmul peak (fp32) for MFU.
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))

    def step():
        t0 = time.perf_counter()
        total = mask.sum()
        loss = 0.0
        for i in range(0, args.batch, args.micro_batch):
            sl = slice(i, i + args.micro_batch)
            logits = model(input_ids=input_ids[sl]).logits
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[sl].flatten(), reduction="none")
            part = (nll * mask[sl].flatten()).sum() / total
            part.backward()
            loss += part.item()
            del logits, nll, part
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss

    dt, loss = step()  # warmup
    _send({"event": "ready", "warmup_s": dt, "matmul_flops": best, "threads": torch.get_num_threads()})
    while _wait_go():
        dt, loss = step()
        _send({"event": "step", "time_s": dt, "loss": loss})
    _send({"event": "done", "peak_rss_mib": peak_rss_mib()})


def worker_jax(args, cfg, mode):
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig
    from undo_jax.sharding import make_mesh
    from undo_jax.train import TrainConfig, train_tokenized
    from undo_jax.train.data import TokenizedExample

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda x, y: (x @ y).sum())
    mm(a, a).block_until_ready()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))

    model_cfg = ModelConfig(**cfg)
    model = CausalLM(model_cfg, rngs=nnx.Rngs(0), attention=args.attention)
    ids, prompt_len = batch_arrays(cfg, args.batch, args.seq)
    seqs = [TokenizedExample(row, prompt_len) for row in ids]
    config = TrainConfig(lr=1e-5, epochs=args.steps + 1, batch_size=args.batch, micro_batch=args.micro_batch,
                         max_length=args.seq, warmup_ratio=0.0, schedule="constant", clip_norm=1.0,
                         remat=mode == "remat", compute_dtype="bfloat16" if mode == "bf16" else "float32",
                         loss_chunk=args.loss_chunk, progress=False)
    log_path = Path(tempfile.mkdtemp()) / "log.jsonl"
    state = {"first": True}

    def after_step(epoch, _model):
        record = json.loads(log_path.read_text().splitlines()[-1])
        if state["first"]:
            state["first"] = False
            _send({"event": "ready", "warmup_s": record["step_time_s"], "matmul_flops": best,
                   "devices": len(jax.devices())})
        else:
            _send({"event": "step", "time_s": record["step_time_s"], "loss": record["loss"]})
        if epoch < config.epochs and not _wait_go():
            raise SystemExit(0)

    del jnp, np
    train_tokenized(model, seqs, config, mesh=make_mesh(devices=jax.devices()[:1]), log_path=log_path,
                    epoch_end_callback=after_step)
    _wait_go()  # the parent's "stop"
    _send({"event": "done", "peak_rss_mib": peak_rss_mib()})


# ---------------------------------------------------------------- parent
class Worker:
    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited early (rc={self.proc.wait()})")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def go(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        done = self.read()
        self.proc.wait()
        return done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, seconds-long smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework and mode (after 1 warmup)")
    parser.add_argument("--modes", default="fp32,remat,bf16", help="undo_jax modes: fp32, remat, bf16")
    parser.add_argument("--micro-batch", type=int, default=2,
                        help="rows per forward/backward, gradients accumulated to --batch (both frameworks)")
    parser.add_argument("--loss-chunk", type=int, default=2048)
    parser.add_argument("--phases", default=None,
                        help="run order, e.g. torch,fp32,torch,remat,bf16 (default: torch, then modes, then torch)")
    parser.add_argument("--torch-remat", action="store_true", help="gradient checkpointing in the PyTorch loop")
    parser.add_argument("--attention", default="auto", help="undo_jax attention backend (undo_jax.models.attention)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = TINY if args.tiny else SMOLLM2_135M

    if args.worker == "torch":
        return worker_torch(args, cfg)
    if args.worker:
        return worker_jax(args, cfg, args.worker)

    common = [f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}", f"--loss-chunk={args.loss_chunk}",
              f"--micro-batch={args.micro_batch}", f"--attention={args.attention}"]
    common += ["--tiny"] if args.tiny else []
    common += ["--torch-remat"] if args.torch_remat else []
    tokens_per_step = args.batch * args.seq
    flops = model_flops_per_step(cfg, args.batch, args.seq)
    modes = args.modes.split(",")
    phases = args.phases.split(",") if args.phases else ["torch", *modes, "torch"]
    results = {"model": "tiny" if args.tiny else "SmolLM2-135M shape (random init)", "attention": args.attention,
               "batch": args.batch,
               "micro_batch": args.micro_batch, "seq": args.seq, "timed_steps": args.steps,
               "model_tflop_per_step": flops / 1e12, "phases": phases, "modes": {}}
    peak, torch_times, torch_rss, load = 0.0, [], 0.0, {}
    for phase in phases:
        # One worker at a time: two 135M training processes at once do not fit this shared machine's memory.
        worker = Worker([*common, f"--worker={phase}"])
        ready = worker.read()
        peak = max(peak, ready["matmul_flops"])
        times = [worker.go()["time_s"] for _ in range(args.steps)]
        done = worker.stop()
        load[phase] = os.getloadavg()[0]
        if phase == "torch":
            torch_times += times
            torch_rss = max(torch_rss, done["peak_rss_mib"])
            results["torch_threads"] = ready["threads"]
        else:
            results["modes"][phase] = {"undo_jax_step_times": times, "undo_jax_first_step_s": ready["warmup_s"],
                                       "undo_jax_peak_rss_mib": done["peak_rss_mib"]}
        print(json.dumps({phase: times, "load": load[phase]}), file=sys.stderr, flush=True)
    tt = statistics.median(torch_times)
    results.update(torch_step_times=torch_times, torch_s_per_step=tt, torch_tokens_per_s=tokens_per_step / tt,
                   torch_peak_rss_mib=torch_rss, torch_mfu=flops / tt / peak, matmul_peak_gflops=peak / 1e9,
                   load_average_after_phase=load)
    for entry in results["modes"].values():
        jt = statistics.median(entry["undo_jax_step_times"])
        entry.update(undo_jax_s_per_step=jt, undo_jax_tokens_per_s=tokens_per_step / jt,
                     ratio_tokens_per_s_vs_torch=tt / jt, undo_jax_mfu=flops / jt / peak)
    results["load_average"] = os.getloadavg()
    print(json.dumps(results))  # one JSON object per line on stdout; the readable copy goes to --out
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
