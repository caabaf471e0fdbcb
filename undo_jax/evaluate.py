"""Score any student on any task split: `python -m undo_jax.evaluate --student=S --task=svamp --split=test`.

S is a HF directory, a .gguf file, a hub id, `smollm2-gguf`, or a run's iteration `RUN/iter_K` (restored from
its Orbax checkpoint). Writes one row per question (completion, extracted answer, correct) to --eval_out and
the accuracy (with a per-group breakdown) beside it as `<out>.summary.json`; prints the summary. A killed
evaluation resumes from its finished chunks when re-run with the same --eval_out.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from absl import flags

from undo_jax.flags import FLAGS, ConfigError, EvalConfig, eval_config_from_flags

PROG = "undo_jax.evaluate"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def evaluate(cfg: EvalConfig, *, progress: bool = False) -> dict:
    """Run the evaluation described by `cfg`; returns the summary (also written beside the rows)."""
    from undo_jax import distributed
    from undo_jax.sharding import make_mesh
    from undo_jax.tasks import TaskDataError, get_task
    from undo_jax.undo.loop import UndoError, resolve_data_source
    from undo_jax.undo.rundir import atomic_write_json
    from undo_jax.undo.student import EvalSettings, evaluate_records, load_student

    task = get_task(cfg.task)
    source = resolve_data_source(cfg.data_source)
    try:
        records = task.load(cfg.split, source, val_size=cfg.val_size, seed=cfg.data_seed)
    except (TaskDataError, FileNotFoundError, ValueError) as e:
        raise UndoError(f"task {cfg.task} data ({source or 'hub'}): {_one_line(e)}") from None
    if cfg.split == "test" and cfg.test_size:
        records = records[: cfg.test_size]
    out = Path(cfg.eval_out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UndoError(f"--eval_out={cfg.eval_out}: cannot create its folder ({e.strerror or e})") from None
    try:
        mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    except ValueError as e:
        raise UndoError(f"--mesh_*: {e}") from None
    model, tokenizer = load_student(cfg.student, param_dtype=cfg.param_dtype, mesh=mesh)
    settings = EvalSettings(max_new_tokens=cfg.max_new_tokens, maj_k=cfg.maj_k, temperature=cfg.eval_temperature,
                            batch_size=cfg.eval_batch_size, chunk=cfg.eval_chunk, seed=cfg.seed)
    summary = evaluate_records(model, tokenizer, task, records, settings, out, mesh=mesh, progress=progress,
                               write=distributed.is_primary())
    summary = {"student": cfg.student, "task": cfg.task, "split": cfg.split, "maj_k": cfg.maj_k,
               "max_new_tokens": cfg.max_new_tokens, **summary}
    if distributed.is_primary():
        atomic_write_json(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        try:
            FLAGS(argv)
        except flags.Error as e:
            raise ConfigError(_one_line(e)) from None
        cfg = eval_config_from_flags()
    except ConfigError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    from undo_jax import distributed

    distributed.maybe_initialize()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from undo_jax.tasks import TaskDataError
    from undo_jax.undo import RunDirError, StudentError, UndoError

    try:
        summary = evaluate(cfg, progress=sys.stderr.isatty())
    except (UndoError, StudentError, RunDirError, TaskDataError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    if distributed.is_primary():
        print(json.dumps({k: v for k, v in summary.items() if k != "breakdown"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
