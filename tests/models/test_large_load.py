"""A Qwen2.5-1.5B-shaped checkpoint (random bf16, ~3.1 GB) loads sharded onto 8 simulated CPU devices.

The load runs in a fresh subprocess (bench/load.py's worker), which reports the shardings it got,
a few loaded tensors compared with the file, and its peak RSS.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # writes and reads ~3.1 GB: a minute or two on 2 cores

REPO = Path(__file__).resolve().parents[2]


def _bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qwen25_15b_shape_loads_sharded_within_memory_budget(tmp_path):
    bench = _bench_load()
    ckpt = tmp_path / "qwen2.5-1.5b-random"
    try:
        _check_load(bench, ckpt)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)  # 3 GB: do not leave it in pytest's kept temp dirs


def _check_load(bench, ckpt):
    total = bench.write_random_checkpoint(ckpt, bench.QWEN25_15B, dtype="bfloat16", max_shard_bytes=512 << 20)
    assert total > 3_000_000_000  # 1.54 B parameters in bf16
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 4

    report = bench.measure("undo_jax", str(ckpt), dtype="bfloat16", mesh=True, verify=True)
    print("\n" + json.dumps({k: v for k, v in report.items() if k != "sharding"}))
    assert report["devices"] == 8 and report["loaded_param_bytes"] == total
    assert report["mismatched_values"] == []  # loaded tensors equal the file's, converted by hand

    sharding = report["sharding"]
    assert sharding["mismatches"] == []  # every param: the NamedSharding the rules give, and its shard shape
    # Every param is either split over devices or (norms: no sharded axis) replicated.
    # Stacked layers: one [28, ...] param per layer tensor kind, its leading `layers` axis replicated.
    assert sharding["n_split"] + sharding["n_replicated"] == sharding["n_params"] == 12 + 2
    assert sharding["n_split"] == 10 + 1  # 7 projections + 3 biases, and the embedding
    specs = sharding["specs"]
    assert specs["embed_tokens"] == "P('tensor', 'fsdp')"
    assert specs["layers/self_attn/q_proj"] == "P(None, 'fsdp', 'tensor', None)"
    assert specs["layers/self_attn/o_proj"] == "P(None, 'tensor', None, 'fsdp')"
    assert specs["layers/mlp/down_proj"] == "P(None, 'tensor', 'fsdp')"
    assert specs["layers/self_attn/k_bias"] == "P(None, 'tensor', None)"
    assert specs["norm/weight"] == "P(None,)"

    # One tensor at a time from per-tensor memory maps: the host never holds the model twice.
    assert report["peak_rss_bytes"] < 2 * report["checkpoint_bytes"], report
