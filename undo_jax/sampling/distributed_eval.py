"""Data-parallel generation over every device of every process: `generate_distributed`.

Design: every process passes the same full prompt list; the sampler plans the same length-sorted
batches on each of them, and each batch is one global array split over the mesh's batch axes, so
every device of every host decodes its share of the rows. The outputs of a batch are gathered onto
all processes, so each one returns the complete list, in input order.

Chosen over "each process generates its own contiguous slice on its local devices" because:
- a row's random stream is keyed by its global prompt index (see `generate`), so sampled outputs,
  not just greedy ones, are identical whatever the number of processes;
- parameters may stay sharded across hosts (fsdp / tensor axes), so a student that does not fit one
  host still evaluates, and the mesh is the one the trainer already built;
- length-sorted global batches keep every device equally busy, with no per-host tail to wait for.
The price is a cross-host all-reduce per decoded token (the "all rows done?" test) and a gather of
each batch's token ids (batch x max_new_tokens int32), both small next to the decode itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from undo_jax.sampling.generate import Completion, generate

__all__ = ["data_parallel_mesh", "generate_distributed", "model_mesh"]


def model_mesh(model) -> Mesh | None:
    """The mesh the model's parameters live on, when they are placed with NamedShardings on one mesh."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(nnx.state(model))
              if isinstance(getattr(leaf, "sharding", None), NamedSharding)}
    return meshes.pop() if len(meshes) == 1 else None


def data_parallel_mesh() -> Mesh:
    """All devices of all processes on the 'data' axis (fsdp = tensor = 1): pure data parallelism."""
    from undo_jax.sharding import make_mesh

    return make_mesh(data=jax.device_count(), fsdp=1, tensor=1)


def _replicate_onto(model, mesh: Mesh) -> None:
    """Place parameters that are not on `mesh` yet as replicated global arrays, in place.

    Each process holds the whole value, so every process builds its own devices' copies from its
    host copy (no cross-process transfer, which `device_put` of committed arrays refuses).
    """
    devices = set(mesh.devices.flat)
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    if all(getattr(x, "sharding", None) is not None and x.sharding.device_set == devices for x in leaves):
        return
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if getattr(x, "sharding", None) is not None and x.sharding.device_set == devices:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    nnx.update(model, jax.tree.map(place, state))


def _request_digest(prompts, generate_kwargs: dict) -> np.ndarray:
    text = json.dumps([list(prompts) if not isinstance(prompts, str) else prompts,
                       sorted((k, repr(v)) for k, v in generate_kwargs.items() if k != "progress")],
                      sort_keys=True, default=repr)
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint32).copy()


def _check_same_request(prompts, generate_kwargs: dict) -> None:
    """Every process must ask for the same generation, or the shared batches would mix up rows (or hang)."""
    digests = np.asarray(multihost_utils.process_allgather(_request_digest(prompts, generate_kwargs)))
    differing = [i for i in range(digests.shape[0]) if not np.array_equal(digests[i], digests[0])]
    if differing:
        raise ValueError(
            f"generate_distributed: processes {differing} were given other prompts or settings than process 0; "
            "every process must pass the same full prompt list and the same generate arguments"
        )


def generate_distributed(model, tokenizer, prompts: Sequence, *, mesh: Mesh | None = None,
                         **generate_kwargs) -> list[list[Completion]]:
    """`generate` with the prompts spread over all devices of all processes; every process gets all results.

    Call it on every process with the same `prompts` and arguments (checked: a mismatch is a
    ValueError on every process). mesh: default the mesh the model's parameters are on, else all
    devices on the 'data' axis (parameters not yet on it are replicated onto it, in place).
    generate_kwargs: as `generate` (max_new_tokens, temperature, num_samples, seed, batch_size, ...).
    With one process this is `generate(..., mesh=mesh)` on the local devices.
    """
    if jax.process_count() > 1:
        _check_same_request(prompts, generate_kwargs)
    if mesh is None:
        mesh = model_mesh(model)
        if mesh is None or mesh.devices.size != jax.device_count():
            mesh = data_parallel_mesh()
    _replicate_onto(model, mesh)
    return generate(model, tokenizer, prompts, mesh=mesh, **generate_kwargs)
