"""Run (or resume) UNDO or the standard-distillation baseline: `python -m undo_jax.main --flagfile=configs/demo.cfg`.

The flags are generated from the configuration tree (`undo_jax.config.RunConfig`; `--helpfull` lists them by
part). They are parsed and validated before any work; a bad flag, a missing data file, an unusable run
directory, teacher or checkpoint stops the run with one line on stderr (exit status 2 for flags, 1 otherwise)
and leaves the run directory as it was, so the corrected command resumes it.
"""

from __future__ import annotations

import json
import sys

from undo_jax.config import RunConfig
from undo_jax.errors import one_line
from undo_jax.flags import parse as parse_flags
from undo_jax.flags import start_command

PROG = "undo_jax.main"


def parse(argv: list[str]) -> RunConfig:
    """Parse and validate the command line; raises ConfigError (one line) on any problem."""
    return parse_flags(RunConfig, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = start_command(RunConfig, argv, PROG)
    except SystemExit as e:
        return int(e.code or 0)
    from undo_jax import distributed
    from undo_jax.tasks import TaskDataError
    from undo_jax.undo import RunDirError, StudentError, UndoError, run

    try:
        state = run(cfg, progress=sys.stderr.isatty())
    except (RunDirError, UndoError, StudentError, TaskDataError, OSError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    if distributed.is_primary():
        print(json.dumps({"run_dir": cfg.run_dir, **state}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
