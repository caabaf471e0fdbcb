"""One process of a multi-process UNDO run (the whole loop) on CPU; writes what it saw as JSON.

Every process runs `undo_jax.undo.run` on the same run directory with the same flags. Each one gets
its own scripted teacher that counts the requests it receives: only process 0 may ask the teacher
anything; the others read the teacher's data from the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.multihost.worker import run_or_die


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="coordinator port on 127.0.0.1")
    parser.add_argument("--out", type=Path, required=True, help="run directory shared by all processes")
    parser.add_argument("--student", type=Path, required=True, help="Hugging Face directory of the student")
    parser.add_argument("--mesh", default="1,2,2", help="data,fsdp,tensor axis sizes of the global mesh")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from undo_jax import distributed

    if args.num_processes > 1:
        distributed.maybe_initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                     process_id=args.process_id)
    import jax

    from tests.undo.scripted_teacher import ScriptedTeacher
    from undo_jax.config import run_config
    from undo_jax.undo import run

    data, fsdp, tensor = (int(n) for n in args.mesh.split(","))
    cfg = run_config(
        run_dir=str(args.out / "run"), student=str(args.student), data_source="demo", val_size=8, train_size=16,
        test_size=8, epochs_first=2, epochs_later=1, lr=1e-3, warmup_ratio=0.0, batch_size=8, micro_batch=8,
        max_length=256, max_new_tokens=12, eval_batch_size=8, eval_chunk=8, max_iterations=2, eval_base=False,
        diagnosis_examples=4, rewrite_examples=2, teacher="reference", mesh_data=data, mesh_fsdp=fsdp,
        mesh_tensor=tensor)
    # A teacher per process, with a cache outside the run directory: the loop must never ask it off process 0.
    teacher = ScriptedTeacher(cache_path=str(args.out / f"teacher_cache_{jax.process_index()}.sqlite"))
    state = run(cfg, teacher=teacher)
    report = {"process_index": jax.process_index(), "state": state,
              "teacher_requests": [kind for kind, _ in teacher.requests]}
    path = args.out / f"worker_{jax.process_index()}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    tmp.replace(path)
    distributed.sync("done")
    return 0


if __name__ == "__main__":
    run_or_die(sys.argv[1:], main)
