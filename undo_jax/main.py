"""Run (or resume) UNDO or the standard-distillation baseline: `python -m undo_jax.main --flagfile=configs/demo.cfg`.

The flags are generated from the configuration tree (`undo_jax.config.RunConfig`; `--help` lists them by
part). Everything that can fail is checked before anything is written: the flags, then (before JAX is
imported) the data source, student, teacher SDK and key and run directory (`undo_jax.preflight`), then the
data, tokenizer and mesh. A failed check prints one line on stderr (exit status 2 for flags, 1 otherwise) and
leaves the run directory absent or as it was, so the corrected command runs. `--dry_run` prints the plan and
its cost bounds; `--status` where the run stands.
"""

from __future__ import annotations

import json
import sys

from undo_jax.config import RunConfig
from undo_jax.flags import fail, parse_command, parse_or_exit, start_logging, start_process
from undo_jax.progress import configure as configure_progress

PROG = "undo_jax.main"
DESCRIPTION = "Run (or resume) UNDO or standard distillation; re-running the same command resumes the run."


def parse(argv: list[str]) -> RunConfig:
    """Parse and validate the command line; raises ConfigError (one line) on any problem."""
    return parse_command(RunConfig, argv).cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        command = parse_or_exit(RunConfig, argv, PROG, DESCRIPTION)
    except SystemExit as e:
        return int(e.code or 0)
    if "status" in command.actions:
        from undo_jax.status import show

        return show(command.run_dir, PROG)
    cfg = command.cfg
    from undo_jax.preflight import PreflightError, check_run

    try:
        deferred = check_run(cfg, dry_run="dry_run" in command.actions)
    except PreflightError as e:
        return fail(PROG, e)
    start_process()
    from undo_jax import distributed
    from undo_jax.hub import HubError
    from undo_jax.tasks import TaskDataError
    from undo_jax.undo import RunDirError, StudentError, UndoError, UndoRun

    try:
        configure_progress(cfg.output.progress_every)
        undo_run = UndoRun(cfg, progress=True)  # a bar on a terminal, else a plain line every --progress_every
        undo_run.check()
        if "dry_run" in command.actions:
            from undo_jax.undo.plan import print_plan

            print_plan(undo_run)
            for problem in deferred:
                print(f"note: the run itself would stop here: {problem}")
            return 0
        start_logging()
        state = undo_run.run()
    except (RunDirError, UndoError, StudentError, TaskDataError, HubError, OSError) as e:
        return fail(PROG, e)
    if distributed.is_primary():
        print(json.dumps({"run_dir": cfg.run_dir, **state}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
