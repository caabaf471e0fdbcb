"""Start N CPU processes of `tests.multihost.worker` on localhost with `jax.distributed`, wait, collect.

Each worker logs to its own file (never a pipe: two processes blocked on full pipes while waiting
for each other at a barrier would hang the test). A worker that fails, or a run that outlives its
timeout, ends every worker of the run and fails with the tail of each worker's log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = "tests.multihost.worker"
LOG_TAIL_CHARS = 4000


class WorkerFailure(AssertionError):
    """A worker exited with an error or the run timed out; the message holds the workers' log tails."""


def free_port() -> int:
    """A port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    # Drop XLA's repeated "Involuntary full rematerialization" warnings: they bury the traceback.
    lines = [line for line in text.splitlines() if "Involuntary full rematerialization" not in line]
    return "\n".join(lines)[-LOG_TAIL_CHARS:]


class WorkerRun:
    """The worker started as `num_processes` processes sharing `out_dir` (started at construction)."""

    def __init__(self, out_dir: Path, *, num_processes: int, devices_per_process: int, steps: str | None = None,
                 mesh: str | None = None, module: str = WORKER_MODULE, extra_args: tuple[str, ...] = (),
                 init_from_env: bool = False):
        self.out_dir = out_dir
        self.num_processes = num_processes
        out_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = worker_env(devices_per_process)
        self.logs = [out_dir / f"worker_{i}.log" for i in range(num_processes)]
        self.procs: list[subprocess.Popen] = []
        try:
            for i, log in enumerate(self.logs):
                cmd = [sys.executable, "-m", module, "--process-id", str(i), "--num-processes",
                       str(num_processes), "--port", str(port), "--out", str(out_dir), *extra_args]
                if steps is not None:
                    cmd += ["--steps", steps]
                if mesh is not None:
                    cmd += ["--mesh", mesh]
                process_env = dict(env)
                if init_from_env:  # the variables undo_jax.distributed.maybe_initialize() reads
                    process_env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
                with log.open("w") as log_file:
                    self.procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=process_env, stdout=log_file,
                                                       stderr=subprocess.STDOUT))
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def _failed(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.returncode not in (None, 0)]

    def wait(self, deadline: float) -> list[dict]:
        """Reports of all processes (by process id); kills every worker on a failure or past `deadline`."""
        try:
            while any(p.poll() is None for p in self.procs) and not self._failed():
                if time.monotonic() > deadline:
                    raise WorkerFailure(self._describe("the run did not finish in time"))
                time.sleep(0.2)
            if failed := self._failed():
                codes = [self.procs[i].returncode for i in failed]
                raise WorkerFailure(self._describe(f"worker(s) {failed} exited with {codes}"))
        finally:
            self.kill()
        return [json.loads((self.out_dir / f"worker_{i}.json").read_text()) for i in range(self.num_processes)]

    def _describe(self, why: str) -> str:
        parts = [f"multi-process run in {self.out_dir} failed: {why}"]
        parts += [f"----- worker {i} ({log.name}) -----\n{_tail(log)}" for i, log in enumerate(self.logs)]
        return "\n".join(parts)


def run_all(runs: dict[str, dict], root: Path, timeout_s: float = 300.0) -> dict[str, list[dict] | WorkerFailure]:
    """Start every run at once (name -> WorkerRun arguments) and wait for all of them, within one deadline.

    Returns each run's reports, or the WorkerFailure that ended it (the other runs still finish), so
    that one broken configuration fails only the tests that read it.
    """
    started: dict[str, WorkerRun] = {}
    results: dict[str, list[dict] | WorkerFailure] = {}
    try:
        for name, kwargs in runs.items():
            started[name] = WorkerRun(root / name, **kwargs)
        deadline = time.monotonic() + timeout_s
        for name, run in started.items():
            try:
                results[name] = run.wait(deadline)
            except WorkerFailure as failure:
                results[name] = failure
    finally:
        for run in started.values():
            run.kill()
    return results
