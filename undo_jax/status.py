"""Where a run stands: `python -m undo_jax.status RUN` (or `python -m undo_jax.main --status --run_dir=RUN`).

Prints, from the run directory alone (no JAX, nothing written): who holds the run lock, a table of
iterations x stages (done / running / failed / not started), the training step and loss of the latest
training log, validation/test accuracy so far, and the teacher calls and cost recorded by finished stages.
A stage is *failed* when the lock file names it but no live process holds the lock: the run was killed
there, or stopped on the error the file records. Re-running the run's command resumes it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from undo_jax.config import RunConfig
from undo_jax.configtree import ConfigError, from_json
from undo_jax.preflight import lock_holder
from undo_jax.undo.data_plan import stage_names
from undo_jax.undo.rundir import RunDir, RunDirError, read_jsonl

PROG = "undo_jax.status"
USAGE = f"usage: python -m {PROG} RUN_DIR"


class StatusError(RuntimeError):
    """A folder that is not a run directory (message: one line)."""


def read_config(rd: RunDir) -> RunConfig:
    if not rd.config_path.is_file():
        raise StatusError(f"{rd.root}: not a run directory (no config.json)")
    try:
        return from_json(RunConfig, json.loads(rd.config_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise StatusError(f"{rd.config_path}: unreadable ({e})") from None


def lock_record(rd: RunDir) -> dict[str, Any]:
    path = rd.root / "run.lock"
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def stage_table(rd: RunDir, cfg: RunConfig, current: str | None, state_of_current: str) -> dict[int, dict[str, str]]:
    """Iteration -> stage -> state, for every iteration that exists or is named by the lock record."""
    last = max([*rd.iterations(), int(current.split(":")[0]) if current else 0, 1])
    table: dict[int, dict[str, str]] = {}
    for k in range(last + 1):
        for j, name in stage_names(cfg.loop, k):
            state = "done" if rd.is_done(j, name) else "not started"
            if state != "done" and current == f"{j}:{name}":
                state = state_of_current
            table.setdefault(j, {})[name] = state
    return table


def training_progress(rd: RunDir) -> str | None:
    """"iteration K: step S/N, loss L" of the latest training log."""
    for k in reversed(rd.iterations()):
        path = rd.iter_dir(k) / "train_log.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path, tolerate_torn_tail=True)
        total = next((r.get("steps") for r in rows if r.get("event") == "start"), None)
        steps = [r for r in rows if "loss" in r]
        if steps:
            return f"iteration {k}: step {steps[-1]['step']}/{total or '?'}, loss {steps[-1]['loss']:.4f}"
        return f"iteration {k}: step 0/{total or '?'}"
    return None


def accuracies(rd: RunDir) -> list[str]:
    out = []
    for k in rd.iterations():
        parts = []
        for stage, split in (("eval_val", "val"), ("eval_test", "test")):
            info = rd.marker_info(k, stage)
            if info and "summary" in info:
                s = info["summary"]
                parts.append(f"{split} {100 * s['accuracy']:.1f}% ({s['correct']}/{s['n']})")
        if parts:
            out.append(f"iteration {k}: " + ", ".join(parts))
    return out


def teacher_totals(rd: RunDir) -> dict[str, float]:
    """Teacher calls, cache hits, errors and USD recorded in the finished stages' markers."""
    totals = dict.fromkeys(("calls", "cache_hits", "errors", "cost_usd"), 0.0)
    for marker in sorted(rd.root.glob("iter_*/*.DONE")):
        try:
            usage = json.loads(marker.read_text(encoding="utf-8")).get("teacher") or {}
        except json.JSONDecodeError:
            continue
        for entry in usage.values():
            for field in totals:
                totals[field] += float(entry.get(field, 0) or 0)
    return totals


def render(run_dir: str) -> str:
    rd = RunDir(run_dir)
    cfg = read_config(rd)
    holder = lock_holder(rd.root)
    record = holder if holder is not None else lock_record(rd)
    current = record.get("stage")
    lines = [f"run {rd.root}: {cfg.loop.mode} on {cfg.task.name}, student {cfg.student.source}, teacher "
             f"{cfg.teacher.backend}{'/' + cfg.teacher.model if cfg.teacher.model else ''}"]
    if holder is not None:
        lines.append(f"running: pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
                     f"{holder.get('since', '?')}; stage {current or '?'}")
        state_of_current = "running"
    elif record.get("error"):
        lines.append(f"stopped {record.get('ended', '?')} on an error in stage {current or '?'}: {record['error']}")
        state_of_current = "failed"
    elif current:
        lines.append(f"not running: the last run (pid {record.get('pid', '?')} on host {record.get('host', '?')}) "
                     f"was killed in stage {current}; re-run its command to resume")
        state_of_current = "failed"
    else:
        state_of_current = "not started"
        finished = json.loads(rd.state_path.read_text(encoding="utf-8")) if rd.state_path.is_file() else None
        lines.append(f"finished: {finished['iterations']} iterations, stopped by {finished['stop_reason']}, best "
                     f"iteration {finished['best_iteration']}" if finished else "not running")
    table = stage_table(rd, cfg, current, state_of_current)
    columns = list(dict.fromkeys(name for per in table.values() for name in per))
    widths = [max(len(c), 11) for c in columns]
    lines += ["", "iteration  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for k, per in sorted(table.items()):
        lines.append(f"{k:<9}  " + "  ".join(per.get(c, "-").ljust(w) for c, w in zip(columns, widths, strict=True)))
    progress = training_progress(rd)
    if progress:
        lines += ["", f"training: {progress}"]
    acc = accuracies(rd)
    lines += ["", "accuracy: " + ("; ".join(acc) if acc else "none yet")]
    t = teacher_totals(rd)
    lines.append(f"teacher (finished stages): {int(t['calls'])} calls, {int(t['cache_hits'])} cache hits, "
                 f"{int(t['errors'])} errors, ${t['cost_usd']:.4f}")
    return "\n".join(lines) + "\n"


def show(run_dir: str, prog: str = PROG) -> int:
    try:
        sys.stdout.write(render(run_dir))
    except (StatusError, RunDirError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "--helpfull", "-?") for a in args):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    flags = [a for a in args if a.startswith("-")]
    if flags:
        print(f"{PROG}: error: {flags[0]}: unknown option ({USAGE})", file=sys.stderr)
        return 2
    if len(args) != 1:
        print(f"{PROG}: error: expected one run directory, got {len(args)} arguments ({USAGE})", file=sys.stderr)
        return 2
    return show(args[0])


if __name__ == "__main__":
    sys.exit(main())
