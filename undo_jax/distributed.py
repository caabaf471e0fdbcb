"""Multi-host helpers: start `jax.distributed` once, name the primary process, split the global batch,
gather a model for process 0 to export, and take one decision for all processes.

`maybe_initialize` must run before anything touches a JAX backend (`jax.devices()`, any array op),
so `undo_jax.main` calls it first. On a single host without explicit arguments or a
JAX_COORDINATOR_ADDRESS in the environment it does nothing; on a Cloud TPU VM (one host or a pod)
it lets JAX read the topology from the TPU metadata server.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

__all__ = ["host_copy", "is_primary", "maybe_initialize", "on_cloud_tpu_vm", "primary_decides", "process_slice",
           "sync"]

# Asking for a multi-process start without arguments (e.g. several GPU hosts): all three must be set.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def on_cloud_tpu_vm() -> bool:
    """True when JAX found TPU chips and libtpu at import (it decides this once, in cloud_tpu_init)."""
    # Private flag, read defensively: a JAX without it simply never auto-initializes.
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = "gloo",
) -> bool:
    """Start the JAX distributed runtime when asked to; return True if this call started it.

    Explicit arguments (any of the three) always initialize with them; without any, the environment
    can ask (JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID, e.g. on
    several GPU hosts), and otherwise initialization happens only on a Cloud TPU VM, where JAX
    detects hosts and process ids itself. Calling again after a successful start is a no-op
    returning False. `cpu_collectives` picks the cross-process collectives of the CPU backend (gloo
    works without MPI); None leaves JAX's setting alone.
    """
    if jax.distributed.is_initialized():
        return False
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit:
        coordinator_address, num_processes, process_id = _init_args_from_env()
        explicit = coordinator_address is not None
    if not explicit and not on_cloud_tpu_vm():
        return False
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"maybe_initialize: num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"maybe_initialize: process_id {process_id} is outside [0, {num_processes})")
    if _backend_started():
        raise RuntimeError(
            "maybe_initialize: a JAX backend is already running (jax.devices() or an array op ran first); "
            "call undo_jax.distributed.maybe_initialize() before any other JAX call"
        )
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes shared files (run directory, reports, exports)."""
    return jax.process_index() == 0


def process_slice(
    global_batch_size: int, *, process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that this process loads; equal contiguous shares.

    Equal shares are required by `jax.make_array_from_process_local_data`, so a global batch that
    does not divide by the process count is an error rather than a silent remainder.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_slice: process_index {index} is outside [0, {count})")
    if global_batch_size < 0 or global_batch_size % count:
        raise ValueError(
            f"process_slice: global batch size {global_batch_size} is not a non-negative multiple of the "
            f"{count} processes"
        )
    per_process = global_batch_size // count
    return index * per_process, (index + 1) * per_process


def sync(name: str) -> None:
    """Barrier: return once every process reached `sync(name)` (names must match across processes)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _init_args_from_env() -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id) from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    address = os.environ.get(COORDINATOR_ENV) or None
    if address is None:
        return None, None, None
    values = []
    for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        text = os.environ.get(name, "")
        try:
            values.append(int(text))
        except ValueError:
            raise ValueError(f"maybe_initialize: {COORDINATOR_ENV} is set, so {name} must be an integer, "
                             f"got {text!r}") from None
    return address, values[0], values[1]


def host_copy(model: nnx.Module) -> nnx.Module:
    """The model with every parameter whole in this process's memory, for writing files (an export).

    Returns `model` itself when this process can already read all of it. Otherwise gathers what other
    processes hold, which is a collective: every process must call it, although usually only process 0
    writes. The copy holds numpy arrays; it is meant to be read, not run.
    """
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated for x in leaves):
        return model

    def whole(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(whole, state))


def primary_decides(value: bool) -> bool:
    """Process 0's `value` on every process: one decision for all (e.g. "is this stage already done?").

    Each process reading the same shared file can still disagree (one reads before process 0 writes
    it, one after); a collective broadcast cannot. Every process must call it, in the same order.
    """
    if jax.process_count() == 1:
        return bool(value)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))
