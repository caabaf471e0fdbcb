"""Shared set-up of the loop and `undo_jax.evaluate`: the task's splits and the device mesh, from the config."""

from __future__ import annotations

import dataclasses
from typing import Any

from undo_jax.config import MeshConfig, TaskDataConfig
from undo_jax.errors import one_line

SPLITS = ("train", "validation", "test")


class UndoError(RuntimeError):
    """The run cannot go on (message: one line naming what and where)."""


def resolve_data_source(source: str | None) -> str | None:
    from undo_jax.preflight import PreflightError
    from undo_jax.preflight import resolve_data_source as resolve

    try:
        return resolve(source)
    except PreflightError as e:
        raise UndoError(str(e)) from None


@dataclasses.dataclass
class Prepared:
    task: Any  # undo_jax.tasks.Task
    splits: dict[str, list]
    mesh: Any = None  # jax.sharding.Mesh


def load_splits(cfg: TaskDataConfig, splits: tuple[str, ...] = SPLITS) -> tuple[Any, dict[str, list]]:
    """(task, split -> records), cut to --train_size / --test_size."""
    from undo_jax.tasks import TaskDataError, get_task

    task = get_task(cfg.name)
    source = resolve_data_source(cfg.data_source)
    out = {}
    try:
        for split in splits:
            out[split] = task.load(split, source, val_size=cfg.val_size, seed=cfg.data_seed)
    except (TaskDataError, FileNotFoundError, ValueError) as e:
        raise UndoError(f"task {cfg.name} data ({source or 'hub'}): {one_line(e)}") from None
    if cfg.train_size and "train" in out:
        out["train"] = out["train"][: cfg.train_size]
    if cfg.test_size and "test" in out:
        out["test"] = out["test"][: cfg.test_size]
    return task, out


def make_run_mesh(cfg: MeshConfig, *, micro_batch: int | None = None):
    """The (data, fsdp, tensor) mesh; with `micro_batch`, also checks it splits evenly over the batch shards."""
    from undo_jax.sharding import check_rows_fit_mesh, make_mesh

    try:
        mesh = make_mesh(cfg.data, cfg.fsdp, cfg.tensor)
    except ValueError as e:
        import jax

        devices, why = jax.devices(), str(e).removeprefix("make_mesh: ")
        raise UndoError(f"--mesh_data={cfg.data} --mesh_fsdp={cfg.fsdp} --mesh_tensor={cfg.tensor}: does not fit the "
                        f"{len(devices)} {devices[0].platform} device(s) jax sees ({why})") from None
    if micro_batch is not None:
        try:
            check_rows_fit_mesh(micro_batch, mesh, what="--micro_batch")
        except ValueError as e:  # the message names --micro_batch and the mesh already
            raise UndoError(str(e)) from None
    return mesh


def prepare(task: TaskDataConfig, mesh: MeshConfig, *, splits: tuple[str, ...] = SPLITS,
            micro_batch: int | None = None) -> Prepared:
    """Load the task's splits, then build the mesh (cheap failures first)."""
    task_obj, records = load_splits(task, splits)
    return Prepared(task=task_obj, splits=records, mesh=make_run_mesh(mesh, micro_batch=micro_batch))
