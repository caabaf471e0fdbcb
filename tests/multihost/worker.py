"""One process of a multi-process CPU run: fine-tune, generate, checkpoint; writes what it saw as JSON.

Started by `tests/multihost/harness.py` as `python -m tests.multihost.worker` with JAX_PLATFORMS=cpu
and XLA_FLAGS setting the local device count. Every process builds the same tokenizer, model and
data from fixed seeds, so a run with P processes x D devices must match one with 1 process x P*D
devices: the global mesh, the global batch and the computation are the same, only who holds which
rows differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import string
import sys
import time
import traceback
from pathlib import Path

# Small enough to compile and run in seconds per process, large enough that every training step (8
# rows) and generation batch (4 rows) is split over the devices of both processes.
DEFAULT_MESH = "1,2,2"  # data, fsdp, tensor: fsdp spans the processes, tensor stays inside one
NUM_EXAMPLES = 16
# 6 chat prompts (the training format): not a multiple of the 4 batch shards, so a batch is padded.
PROMPTS = [[{"role": "user", "content": q}] for q in
           ("What is 3 + 4?", "What is 12 + 30?", "What is 7 + 8?", "Add 5 and 6.", "What is 1 + 1?", "Sum 20 and 22.")]
MAX_NEW_TOKENS = 10
TEACHER_TOP_K = 4
STEPS = ("train", "teacher_logits", "generate", "generate_distributed", "checkpoint", "export", "mismatch")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="coordinator port on 127.0.0.1")
    parser.add_argument("--out", type=Path, required=True, help="run directory shared by all processes")
    parser.add_argument("--mesh", default=DEFAULT_MESH, help="data,fsdp,tensor axis sizes of the global mesh")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated parts to run (always in this order)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.steps.split(",")) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    return args


def char_tokenizer():
    """Character-level tokenizer with a ChatML template (ids < 128); no files, identical everywhere."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def tiny_llama(seed: int = 0):
    """A random 1-layer Llama filled from numpy (same values on every process, no per-shape compiles)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from undo_jax.models import CausalLM, ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
                         eos_token_id=3, pad_token_id=1)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "norm" in str(names):  # RMSNorm scales start at one
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape).astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def examples():
    from undo_jax.train import Example

    out = []
    for i in range(NUM_EXAMPLES):
        a, b = 3 * i + 1, 7 * i % 23
        out.append(Example(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."))
    return out


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from undo_jax import distributed

    if args.num_processes > 1:
        distributed.maybe_initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                     process_id=args.process_id)

    import jax

    from undo_jax.sharding import make_mesh, shard_model
    from undo_jax.train import TrainConfig, save_model_checkpoint, train

    steps = args.steps.split(",")
    seconds: dict[str, float] = {}
    report: dict = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
                    "seconds": seconds}

    @contextlib.contextmanager
    def timed(name: str):
        start = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - start, 2)

    with timed("setup"):
        tokenizer = char_tokenizer()
        model = tiny_llama()
        mesh = make_mesh(*(int(n) for n in args.mesh.split(",")))
        shard_model(model, mesh)
    if "train" in steps:
        config = TrainConfig(lr=1e-3, epochs=2, batch_size=8, micro_batch=8, max_length=64, warmup_ratio=0.0,
                             packing=False, loss_chunk=0, progress=False, seed=0)
        with timed("train"):
            train(model, tokenizer, examples(), config, mesh=mesh, checkpoint_dir=args.out / "train_ckpt",
                  log_path=args.out / "train_log.jsonl")
    if "teacher_logits" in steps:
        from undo_jax.train.data import tokenize_examples
        from undo_jax.train.teacher_logits import TeacherLogitStore, compute_teacher_logits, example_key

        # The (trained) model as its own logit teacher, on the mesh: batch rows live on both processes' devices.
        seqs, _ = tokenize_examples(tokenizer, examples(), TrainConfig(max_length=64))
        by_id = {str(i): s for i, s in enumerate(seqs)}
        folder = args.out / "teacher_logits"
        with timed("teacher_logits"):
            store = TeacherLogitStore(folder, "tiny", TEACHER_TOP_K)
            report["teacher_logits_counts"] = compute_teacher_logits(model, by_id, store, batch_size=8, mesh=mesh)
        reread = TeacherLogitStore(folder, "tiny", TEACHER_TOP_K)  # what a later stage of any process reads
        report["teacher_logits"] = {}
        for eid, s in by_id.items():
            key = example_key("tiny", TEACHER_TOP_K, s)
            held, read = store.get(key), reread.get(key)
            report["teacher_logits"][eid] = [held.top_ids.tolist(), held.top_logp.tolist(), held.log_tail.tolist(),
                                             bool((read.top_ids == held.top_ids).all()
                                                  and (read.top_logp == held.top_logp).all())]
        report["teacher_logits_again"] = compute_teacher_logits(model, by_id, reread, batch_size=8, mesh=mesh)
    if "generate" in steps:
        from undo_jax.sampling import generate

        with timed("generate"):
            done = generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, mesh=mesh, batch_size=4)
        report["generate"] = [[list(c.token_ids), c.text, c.finish_reason] for (c,) in done]
    if "generate_distributed" in steps:
        from undo_jax.sampling.distributed_eval import generate_distributed

        with timed("generate_distributed"):
            done = generate_distributed(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, batch_size=4)
        report["generate_distributed"] = [[list(c.token_ids), c.text, c.finish_reason] for (c,) in done]
        with timed("generate_distributed_sampled"):
            # Rows draw from (seed, prompt index, sample index): sampling must not depend on the process count.
            done = generate_distributed(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, batch_size=4,
                                        temperature=1.0, num_samples=2, seed=5)
        report["generate_distributed_sampled"] = [[list(c.token_ids) for c in samples] for samples in done]
    if "checkpoint" in steps:
        with timed("checkpoint"):
            save_model_checkpoint(model, args.out / "params_ckpt")
    if "export" in steps:
        from undo_jax.models import save_pretrained

        with timed("export"):
            # Every process takes part in gathering the parameters; only process 0 writes the export.
            host_model = distributed.host_copy(model)
            if distributed.is_primary():
                save_pretrained(host_model, args.out / "hf", tokenizer=tokenizer)
            distributed.sync("export")
    if "mismatch" in steps:
        from undo_jax.sampling.distributed_eval import generate_distributed

        try:  # process 1 asks for other prompts: every process must refuse rather than hang or mix rows
            generate_distributed(model, tokenizer, PROMPTS[: 2 + jax.process_index()], max_new_tokens=2)
            report["mismatch_error"] = None
        except ValueError as e:
            report["mismatch_error"] = str(e)
    write_json(args.out / f"worker_{jax.process_index()}.json", report)
    distributed.sync("done")
    return 0


def run_or_die(argv: list[str], main_fn=None) -> None:
    """Run `main_fn(argv)` (default: this worker's main) and exit with its status; on an error, print the
    traceback and exit at once: a normal exit would first wait (minutes) at jax.distributed's shutdown
    barrier for the other processes, which are blocked in a collective waiting for this one."""
    try:
        code = (main_fn or main)(argv)
    except SystemExit:  # argument errors, before jax.distributed starts
        raise
    except BaseException:  # any error: report it and leave without the shutdown barrier
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(code)


if __name__ == "__main__":
    run_or_die(sys.argv[1:])
