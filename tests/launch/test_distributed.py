"""undo_jax.distributed: batch slices, idempotent initialization, and a real two-process CPU run (gloo).

jax.distributed can start only once per process and only before the backend is up, so everything that
initializes runs in fresh subprocesses; the pure helpers run in-process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from undo_jax import distributed

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_process_slice_tiles_the_global_batch():
    slices = [distributed.process_slice(12, process_index=i, process_count=4) for i in range(4)]
    assert slices == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert distributed.process_slice(7) == (0, 7)  # this test process is the only one


@pytest.mark.parametrize(
    ("batch", "index", "count", "message"),
    [(10, 0, 4, "not a non-negative multiple"), (8, 4, 4, "outside"), (8, -1, 4, "outside"), (-4, 0, 2, "multiple")],
)
def test_process_slice_rejects_uneven_or_out_of_range(batch, index, count, message):
    with pytest.raises(ValueError, match=message):
        distributed.process_slice(batch, process_index=index, process_count=count)


def test_single_host_without_arguments_is_a_no_op():
    assert not distributed.on_cloud_tpu_vm()
    assert distributed.maybe_initialize() is False
    assert distributed.is_primary()
    distributed.sync("single-host")  # no other process to wait for


def test_bad_arguments_fail_before_initializing():
    with pytest.raises(ValueError, match="num_processes"):
        distributed.maybe_initialize("localhost:1", num_processes=0, process_id=0)
    with pytest.raises(ValueError, match="process_id 2"):
        distributed.maybe_initialize("localhost:1", num_processes=2, process_id=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_python(code: str, *args: str, devices: int = 2) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


TWO_PROCESS_WORKER = """
    import json, sys
    import numpy as np
    from undo_jax import distributed

    process_id, port = int(sys.argv[1]), sys.argv[2]
    first = distributed.maybe_initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    second = distributed.maybe_initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    import jax
    from jax.experimental import multihost_utils

    distributed.sync("initialized")
    start, stop = distributed.process_slice(8)
    # Each process loads only its rows; gathering them must rebuild the whole batch on both.
    gathered = multihost_utils.process_allgather(np.arange(100, 108)[start:stop], tiled=True)
    distributed.sync("gathered")
    print(json.dumps({
        "first": first, "second": second, "primary": distributed.is_primary(),
        "process_count": jax.process_count(), "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(), "slice": [start, stop], "gathered": gathered.tolist(),
    }))
"""


def test_two_processes_initialize_once_split_the_batch_and_meet_at_barriers():
    port = str(free_port())
    procs = [start_python(TWO_PROCESS_WORKER, str(i), port) for i in range(2)]
    reports = [finish(p) for p in procs]
    for process_id, report in enumerate(reports):
        assert report["first"] is True and report["second"] is False
        assert report["primary"] is (process_id == 0)
        assert report["process_count"] == 2
        assert (report["global_devices"], report["local_devices"]) == (4, 2)
        assert report["gathered"] == list(range(100, 108))
    assert [r["slice"] for r in reports] == [[0, 4], [4, 8]]


def test_initializing_after_the_backend_started_is_a_clear_error():
    code = """
        import json
        import jax
        from undo_jax import distributed

        jax.devices()
        try:
            distributed.maybe_initialize("localhost:1", num_processes=1, process_id=0)
            print(json.dumps({"error": None}))
        except RuntimeError as e:
            print(json.dumps({"error": str(e)}))
    """
    report = finish(start_python(code))
    assert report["error"] is not None and "before any other JAX call" in report["error"]
