"""Run (or resume) UNDO or the standard-distillation baseline: `python -m undo_jax.main --flagfile=configs/demo.cfg`.

Flags are parsed and validated before any work; a bad flag, a missing data file, an unusable run directory,
teacher or checkpoint stops the run with one line on stderr (exit status 2 for flags, 1 otherwise) and
leaves the run directory as it was, so the corrected command resumes it.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags

from undo_jax.flags import FLAGS, ConfigError, config_from_flags

PROG = "undo_jax.main"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def parse(argv: list[str]):
    """Parse and validate the command line; raises ConfigError (one line) on any problem."""
    try:
        FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(_one_line(e)) from None
    return config_from_flags()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = parse(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    # Must precede every other JAX call (multi-host start); a no-op on a single host.
    from undo_jax import distributed

    distributed.maybe_initialize()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "httpx", "httpx2", "google_genai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from undo_jax.tasks import TaskDataError
    from undo_jax.undo import RunDirError, StudentError, UndoError, run

    try:
        state = run(cfg, progress=sys.stderr.isatty())
    except (RunDirError, UndoError, StudentError, TaskDataError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    if distributed.is_primary():
        print(json.dumps({"run_dir": cfg.run_dir, **state}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
