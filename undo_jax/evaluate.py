"""Score any student on any task split: `python -m undo_jax.evaluate --student=S --task=svamp --split=test`.

S is a HF directory, a .gguf file, a hub id, `smollm2-gguf`, or a run's iteration `RUN/iter_K` (restored from
its Orbax checkpoint). Writes one row per question (completion, extracted answer, correct) to --eval_out and
the accuracy (with a per-group breakdown) beside it as `<out>.summary.json`; prints the summary. A killed
evaluation resumes from its finished chunks when re-run with the same --eval_out. The flags are generated
from `undo_jax.config.EvalCommand` (`--helpfull` lists them by part).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from undo_jax.config import EvalCommand
from undo_jax.flags import fail, parse_or_exit, start_logging, start_process
from undo_jax.progress import configure as configure_progress

PROG = "undo_jax.evaluate"
DESCRIPTION = ("Score a student on a task split (--from_run=RUN: a run's student on the run's own data and "
               "generation settings).")


def evaluate(cfg: EvalCommand, *, progress: bool = False) -> dict:
    """Run the evaluation described by `cfg`; returns the summary (also written beside the rows)."""
    from undo_jax import distributed
    from undo_jax.undo.prepare import UndoError, prepare
    from undo_jax.undo.rundir import atomic_write_json
    from undo_jax.undo.student import evaluate_records, load_student

    split = cfg.output.split
    out = Path(str(cfg.output.eval_out))
    prepared = prepare(cfg.task, cfg.mesh, splits=(split,))
    model, tokenizer = load_student(cfg.student.source, param_dtype=cfg.student.param_dtype, mesh=prepared.mesh,
                                    attention=cfg.student.attention)
    start_logging()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UndoError(f"--eval_out={out}: cannot create its folder ({e.strerror or e})") from None
    summary = evaluate_records(model, tokenizer, prepared.task, prepared.splits[split], cfg.eval, out,
                               mesh=prepared.mesh, progress=progress, write=distributed.is_primary())
    summary = {"student": cfg.student.source, "task": cfg.task.name, "split": split, "maj_k": cfg.eval.maj_k,
               "max_new_tokens": cfg.eval.max_new_tokens, **summary}
    if cfg.source.from_run:
        summary = {"from_run": cfg.source.from_run, **summary}
    if distributed.is_primary():
        atomic_write_json(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = parse_or_exit(EvalCommand, argv, PROG, DESCRIPTION).cfg
    except SystemExit as e:
        return int(e.code or 0)
    from undo_jax.preflight import PreflightError, check_eval

    try:
        check_eval(cfg)
    except PreflightError as e:
        return fail(PROG, e)
    start_process()
    from undo_jax import distributed
    from undo_jax.tasks import TaskDataError
    from undo_jax.undo import RunDirError, StudentError, UndoError

    try:
        configure_progress(cfg.output.progress_every)
        summary = evaluate(cfg, progress=True)
    except (UndoError, StudentError, RunDirError, TaskDataError, OSError) as e:
        return fail(PROG, e)
    if distributed.is_primary():
        print(json.dumps({k: v for k, v in summary.items() if k != "breakdown"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
