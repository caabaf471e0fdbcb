"""Orbax checkpoints: full training state (resume) and params-only snapshots (students to evaluate).

Layout under a training `checkpoint_dir`:
    state/<step>/{state, meta}   CheckpointManager: params, optimizer state, step; meta JSON holds the
                                 data position (step, epoch), dataset fingerprint, config, param shapes
    epochs/epoch_<k>/            params-only snapshot at the end of epoch k (TrainConfig.save_epoch_params)
A params-only snapshot (`save_model_checkpoint`) is `<dir>/params` (Orbax) plus `<dir>/model.json`
(param shapes and the model config). `restore_model` reads either kind.
Orbax writes into a temporary directory and renames it when complete, so a kill mid-save leaves the
previous checkpoint intact and the partial one is ignored (and cleaned up) on the next start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from undo_jax.models.lora import base_fingerprint, lora_settings_of, trainable_filter

STATE_SUBDIR = "state"
EPOCHS_SUBDIR = "epochs"
PARAMS_SUBDIR = "params"
MODEL_META = "model.json"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model or the run it is restored into."""


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def param_shapes(params) -> dict[str, list[int]]:
    """'layers/0/mlp/up_proj' -> shape, for every array in a params pytree (or abstract pytree)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {"/".join(_key_name(k) for k in path): list(leaf.shape) for path, leaf in flat}


def check_shapes(expected: dict[str, list[int]], found: dict[str, list[int]], where: str) -> None:
    """Raise CheckpointMismatchError listing (a few of) the differences between two shape maps."""
    problems = []
    for name in sorted(set(expected) | set(found)):
        want, got = expected.get(name), found.get(name)
        if want is None:
            problems.append(f"{name} is in the checkpoint but not in the model")
        elif got is None:
            problems.append(f"{name} is missing from the checkpoint")
        elif list(want) != list(got):
            problems.append(f"{name} has shape {tuple(got)} in the checkpoint, {tuple(want)} in the model")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} differences)" if len(problems) > 3 else "")
        raise CheckpointMismatchError(f"checkpoint at {where} holds another model's parameters: {shown}")


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with target shardings) for an Orbax restore."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------- training state
class TrainCheckpointer:
    """CheckpointManager over checkpoint_dir/state with async saves and `keep` checkpoints kept."""

    def __init__(self, checkpoint_dir: str | os.PathLike, keep: int):
        self.directory = Path(checkpoint_dir).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory / STATE_SUBDIR, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore(self, step: int, abstract_state) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored.state

    def save(self, step: int, state, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def epoch_params_dir(checkpoint_dir: str | os.PathLike, epoch: int) -> Path:
    """Where train() writes the params-only snapshot of epoch `epoch` (1-based)."""
    return Path(checkpoint_dir) / EPOCHS_SUBDIR / f"epoch_{epoch}"


# ---------------------------------------------------------------- params-only snapshots
def base_pointer(model: nnx.Module, base_source: str | None) -> dict | None:
    """What a LoRA checkpoint (adapters only) records of its base: source, fingerprint, LoRA settings; None for a
    model without adapters."""
    settings = lora_settings_of(model)
    if settings is None:
        return None
    return {"source": base_source, "fingerprint": base_fingerprint(model), "lora": settings.to_dict()}


def _model_meta(model, params, base_source: str | None) -> dict:
    config = getattr(model, "config", None)
    meta = {"param_shapes": param_shapes(params)}
    base = base_pointer(model, base_source)
    if base is not None:
        meta["base"] = base
    if config is not None and dataclasses.is_dataclass(config):
        meta["model_config"] = config.to_hf_dict() if hasattr(config, "to_hf_dict") else dataclasses.asdict(config)
    return meta


def save_params(params, directory: str | os.PathLike, meta: dict, *, overwrite: bool = False) -> Path:
    directory = Path(directory).absolute()
    target = directory / PARAMS_SUBDIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"save_model_checkpoint: {target} already exists (pass overwrite=True to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, params, force=overwrite)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        tmp = directory / f".{MODEL_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, directory / MODEL_META)
    return directory


def save_model_checkpoint(model: nnx.Module, directory: str | os.PathLike, *, overwrite: bool = False,
                          base_source: str | None = None) -> Path:
    """Write the model's parameters (only; of a LoRA model its adapters, with a pointer to the base) to `directory`
    with Orbax; returns the directory."""
    params = nnx.state(model, trainable_filter(model)).to_pure_dict()
    return save_params(params, directory, _model_meta(model, params, base_source), overwrite=overwrite)


def _find_params_source(directory: Path) -> tuple[str, Path | TrainCheckpointer, int | None]:
    if (directory / PARAMS_SUBDIR).is_dir():
        return "params", directory / PARAMS_SUBDIR, None
    if (directory / STATE_SUBDIR).is_dir():
        ckpt = TrainCheckpointer(directory, keep=1_000_000)
        step = ckpt.latest_step()
        if step is not None:
            return "state", ckpt, step
        ckpt.close()
    raise FileNotFoundError(
        f"restore_model: no checkpoint in {directory} (expected {PARAMS_SUBDIR}/ from save_model_checkpoint "
        f"or {STATE_SUBDIR}/<step>/ from train)"
    )


def restore_model(model_template: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """Load params saved by `save_model_checkpoint` or `train` (latest step) into the template, in place.

    The template fixes structure, dtypes and shardings (build it with the right config, shard it
    first to restore straight onto a mesh). A LoRA template (its base loaded) takes the adapters only.
    Returns the template for chaining.
    """
    directory = Path(directory).absolute()
    params = nnx.state(model_template, trainable_filter(model_template)).to_pure_dict()
    expected = param_shapes(params)
    kind, source, step = _find_params_source(directory)
    if kind == "params":
        meta_path = directory / MODEL_META
        if meta_path.is_file():
            check_shapes(expected, json.loads(meta_path.read_text())["param_shapes"], str(directory))
        checkpointer = ocp.StandardCheckpointer()
        restored = checkpointer.restore(source, abstract_like(params))
        checkpointer.close()
    else:
        try:
            meta = source.read_meta(step)
            check_shapes(expected, meta["param_shapes"], str(directory))
            restored = source.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item={"params": abstract_like(params)},
                    restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                              {"params": abstract_like(params)}),
                    partial_restore=True)),
            ).state["params"]
        finally:
            source.close()
    nnx.update(model_template, restored)
    return model_template
