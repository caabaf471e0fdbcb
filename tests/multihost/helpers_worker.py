"""One process of a run that exercises undo_jax.distributed's helpers across real processes.

Initialization comes from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, set by the harness): `maybe_initialize()` is called without arguments, as
`undo_jax.main` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.multihost.worker import run_or_die


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("--process-id", "--num-processes", "--port"):  # the harness passes them; the env decides
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from undo_jax import distributed

    started = distributed.maybe_initialize()
    import jax
    import numpy as np
    from flax import nnx

    from tests.multihost.worker import tiny_llama
    from undo_jax.sharding import make_mesh, shard_model

    model = tiny_llama(seed=4)
    expected = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]}
    shard_model(model, make_mesh(1, 2, 2))  # fsdp across the processes: nobody holds all of any matrix
    copy = distributed.host_copy(model)
    got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
           jax.tree_util.tree_flatten_with_path(nnx.state(copy).to_pure_dict())[0]}
    me = jax.process_index()
    from tests.multihost.worker import MAX_NEW_TOKENS, PROMPTS, char_tokenizer
    from undo_jax.sampling.distributed_eval import generate_distributed

    # A model on no mesh yet (plain local arrays): generate_distributed must place it on every process's devices.
    fresh = generate_distributed(tiny_llama(seed=6), char_tokenizer(), PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    report = {
        "started": started, "process_index": me, "process_count": jax.process_count(),
        "host_copy_is_numpy": all(type(v) is np.ndarray for v in jax.tree.leaves(nnx.state(copy))),
        "host_copy_equal": sorted(got) == sorted(expected) and all(np.array_equal(got[k], expected[k]) for k in got),
        "some_param_split_across_processes": any(not x.is_fully_addressable for x in jax.tree.leaves(nnx.state(model))),
        "decided_true": distributed.primary_decides(me == 0),
        "decided_false": distributed.primary_decides(me != 0),
        "fresh_model_generation": [list(c.token_ids) for (c,) in fresh],
    }
    path = args.out / f"worker_{me}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)
    distributed.sync("done")
    return 0


if __name__ == "__main__":
    run_or_die(sys.argv[1:], main)
