"""Device mesh (data, fsdp, tensor) and logical-axis rules that place parameters and batches on it.

Parameters carry `logical_axes` metadata (see `undo_jax.models.decoder`); `DEFAULT_RULES` maps those
names onto mesh axes: weights are split over `fsdp` along the model dimension and over `tensor`
along heads / MLP / vocabulary; batches are split over (`data`, `fsdp`). With `fsdp=1, tensor=1` the
same code is pure data parallelism, with `data=1, fsdp=1` pure tensor parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "batch_row_multiple",
    "batch_sharding",
    "check_rows_fit_mesh",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "replicated",
    "shard_model",
    "spec_for_shape",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked decoder layers' leading axis: every device holds every layer's slice
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    At most one axis may be -1; it takes whatever devices the others leave. On TPU the device order
    follows the physical topology (`mesh_utils`), so `tensor` lands on the closest chips.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices do not divide by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices "
            f"(data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]})"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - topology-aware order is an optimisation; plain order is always valid
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, AXES)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec; a mesh axis used by an earlier dimension is not reused."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in logical_axes:
        axis = rules.get(name) if name is not None else None
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        if not names or used.intersection(names):
            out.append(None)
            continue
        used.update(names)
        out.append(axis)
    return PartitionSpec(*out)


def spec_for_shape(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   rules: Mapping | None = None) -> PartitionSpec:
    """`logical_to_spec`, then replicate every dimension the mesh axes do not divide evenly."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"logical_axes {tuple(logical_axes)} do not match a parameter of shape {tuple(shape)}")
    spec = logical_to_spec(logical_axes, rules)
    fixed = [axis if axis is not None and dim % _axis_size(mesh, axis) == 0 else None
             for dim, axis in zip(shape, spec, strict=True)]
    return PartitionSpec(*fixed)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_row_multiple(mesh: Mesh) -> int:
    """Rows of a batch must be a multiple of this: the number of batch shards (data x fsdp)."""
    return _axis_size(mesh, BATCH_AXES)


def check_rows_fit_mesh(rows: int, mesh: Mesh, *, what: str = "micro_batch") -> None:
    """ValueError (one line) unless `rows` splits evenly over the mesh's batch shards."""
    multiple = batch_row_multiple(mesh)
    if rows % multiple:
        raise ValueError(f"{what}={rows} is not a multiple of the mesh's batch shards (data x fsdp = {multiple})")


def param_shardings(model_or_state, mesh: Mesh, rules: Mapping | None = None):
    """NamedShardings for `nnx.state(model)` (same tree: each Variable holds its sharding).

    Variables without `logical_axes` metadata and plain arrays (e.g. RoPE constants) are replicated.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            axes = leaf.get_metadata().get("logical_axes")
            if axes is None or not hasattr(value, "shape"):
                return leaf.replace(value=replicated(mesh))
            return leaf.replace(value=NamedSharding(mesh, spec_for_shape(value.shape, axes, mesh, rules)))
        return replicated(mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
    """Move the model's state onto `mesh` per the rules, in place; returns the model for chaining."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model
