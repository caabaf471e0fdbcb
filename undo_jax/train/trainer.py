"""`train()`: supervised fine-tuning of a CausalLM on (prompt, completion) examples, sharded, resumable.

The host side (tokenize, choose each step's examples, pack, place on the mesh, log, checkpoint) is
plain Python around four jitted functions from `undo_jax.train.step`, each compiled once per batch
shape, with explicit in/out shardings and the training state donated.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from undo_jax.models.lora import trainable_filter
from undo_jax.sharding import (
    batch_row_multiple,
    batch_sharding,
    check_rows_fit_mesh,
    make_mesh,
    param_shardings,
    replicated,
)
from undo_jax.train import data as data_lib
from undo_jax.train.checkpoint import (
    CheckpointMismatchError,
    TrainCheckpointer,
    abstract_like,
    base_pointer,
    check_shapes,
    epoch_params_dir,
    param_shapes,
    save_params,
)
from undo_jax.train.config import Example, TrainConfig
from undo_jax.train.on_policy import OnPolicyTeacher, is_on_policy_step, student_samples
from undo_jax.train.step import (
    BATCH_KEYS,
    TEACHER_KEYS,
    completion_loss_sum,
    learning_rate_schedule,
    make_optimizer,
    make_step_functions,
)

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, nnx.Module], None]


# ---------------------------------------------------------------- helpers
def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows [start, stop) of a global array of `shape` that this process's devices hold under `sharding`.

    Half the rows each with the batch split over two processes; all of them when the batch axes stay
    inside each process (e.g. a tensor axis that spans the processes replicates the batch across them).
    """
    spans = {index[0].indices(shape[0])[:2] for index in sharding.addressable_devices_indices_map(shape).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"train: this process's devices hold non-adjacent batch rows {sorted(spans)}; order the mesh "
                         "devices so that each process's devices are adjacent along the batch axes")
    return start, stop


def place_batch(batch: data_lib.MicroBatch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Every process built the same global batch; each hands JAX only the rows its devices hold."""
    start, stop = process_rows(sharding, batch.shape)
    return {k: jax.make_array_from_process_local_data(sharding, v[start:stop], v.shape)
            for k, v in batch.arrays().items()}


def compute_graphdef(model: nnx.Module, compute_dtype: str, trainable=nnx.Param):
    """(graphdef, trainable state, rest) of the model with every module's `dtype` (compute dtype) set; params are
    not copied. `trainable`: the variable filter the optimizer sees (a LoRA model's: `nnx.LoRAParam`)."""
    graphdef, state = nnx.split(model)
    abstract = nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    for _, module in nnx.iter_modules(abstract):
        if hasattr(module, "dtype"):
            module.dtype = jnp.dtype(compute_dtype)
    return nnx.split(abstract, trainable, ...)


def optimizer_state_shardings(opt_shapes, params_struct, params_sh, mesh):
    """Moment trees (same structure as params) follow the param shardings; scalars are replicated."""

    def is_param_tree(x):
        return jax.tree.structure(x) == params_struct

    return jax.tree.map(lambda x: params_sh if is_param_tree(x) else replicated(mesh), opt_shapes,
                        is_leaf=is_param_tree)


def _rewrite_log(log_path: Path, keep_through_step: int) -> None:
    """Drop log records of steps after the resume point (they will be logged again); atomic."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= keep_through_step:
            kept.append(line)
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log_path)


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from undo_jax.progress import progress_bar

            self.bar = progress_bar(total, "train", unit="step", initial=initial)

    def update(self, record: dict):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()



@dataclasses.dataclass(frozen=True)
class _StepPrograms:
    tx: optax.GradientTransformation
    params_sh: dict
    opt_sh: object
    opt_shapes: object
    batch_sh: NamedSharding
    first: Callable
    add: Callable
    apply: Callable
    single: Callable


_PROGRAM_CACHE: collections.OrderedDict = collections.OrderedDict()
_PROGRAM_CACHE_SIZE = 4


def _step_programs(graphdef, config: TrainConfig, total_steps: int, mesh, params_host, params_sh, frozen_sh, *,
                   distill: bool = False) -> _StepPrograms:
    """The jitted step functions for one (model graph, config, schedule length, mesh).

    Cached, so calling `train` again with the same setup (a resume, the next epoch block, a test)
    reuses the compiled executables instead of compiling again.
    """
    shapes = tuple((k, tuple(v)) for k, v in sorted(param_shapes(params_host).items()))
    key = (graphdef, config.trajectory_dict().__repr__(), total_steps, mesh, shapes, repr(frozen_sh), distill)
    if key in _PROGRAM_CACHE:
        _PROGRAM_CACHE.move_to_end(key)
        return _PROGRAM_CACHE[key]
    rep = replicated(mesh)
    tx = make_optimizer(config, total_steps)
    schedule = learning_rate_schedule(config, total_steps)
    first_grads, add_grads, apply_update, single_step = make_step_functions(graphdef, tx, schedule, config)
    opt_shapes = jax.eval_shape(tx.init, params_host)
    opt_sh = optimizer_state_shardings(opt_shapes, jax.tree.structure(params_host), params_sh, mesh)
    state_sh = {"params": params_sh, "opt_state": opt_sh, "step": rep}
    acc_sh = {"grads": params_sh, "loss_sum": rep, "count": rep}
    batch_sh = batch_sharding(mesh)
    mb_sh = dict.fromkeys(BATCH_KEYS + (TEACHER_KEYS if distill else ()), batch_sh)
    programs = _StepPrograms(
        tx=tx, params_sh=params_sh, opt_sh=opt_sh, opt_shapes=opt_shapes, batch_sh=batch_sh,
        first=jax.jit(first_grads, in_shardings=(params_sh, mb_sh, frozen_sh), out_shardings=acc_sh),
        add=jax.jit(add_grads, in_shardings=(params_sh, acc_sh, mb_sh, frozen_sh), out_shardings=acc_sh,
                    donate_argnums=1),
        # The accumulator is not donated: it has one param-sized tree more than the outputs could reuse.
        apply=jax.jit(apply_update, in_shardings=(state_sh, acc_sh), out_shardings=(state_sh, rep), donate_argnums=0),
        single=jax.jit(single_step, in_shardings=(state_sh, mb_sh, frozen_sh), out_shardings=(state_sh, rep),
                       donate_argnums=0),
    )
    _PROGRAM_CACHE[key] = programs
    while len(_PROGRAM_CACHE) > _PROGRAM_CACHE_SIZE:
        _PROGRAM_CACHE.popitem(last=False)
    return programs


def functional_view(model: nnx.Module, compute_dtype: str, mesh):
    """(graphdef, trainable params, frozen rest, their shardings on `mesh`) of a model, as pure dicts.

    Trainable: every Param, or a LoRA model's adapters only; the rest (a LoRA base, quantised or not) is
    passed to the step functions as an argument, never differentiated, never in the optimizer state.
    """
    trainable = trainable_filter(model)
    graphdef, _, _ = compute_graphdef(model, compute_dtype, trainable)
    _, params_state, frozen_state = nnx.split(model, trainable, ...)
    if trainable is nnx.Param and jax.tree.leaves(frozen_state):
        raise ValueError("train: the model holds non-Param state (e.g. batch statistics); only Param models are "
                         "supported")
    params_sh = param_shardings(params_state, mesh).to_pure_dict()
    frozen_sh = param_shardings(frozen_state, mesh).to_pure_dict()
    return graphdef, params_state.to_pure_dict(), frozen_state.to_pure_dict(), params_sh, frozen_sh


def trajectory_settings(config: TrainConfig, on_policy: bool) -> dict:
    """The settings a checkpoint must match to resume; the on-policy ones only where steps sample (so
    checkpoints of other runs, and of runs before these settings existed, are unaffected)."""
    settings = config.trajectory_dict()
    if not on_policy:
        settings = {k: v for k, v in settings.items() if not k.startswith("on_policy_")}
    return settings


# ---------------------------------------------------------------- the trainer
def train(
    model: nnx.Module,
    tokenizer,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    mesh=None,
    checkpoint_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    epoch_end_callback: EpochCallback | None = None,
    base_source: str | None = None,
) -> nnx.Module:
    """Fine-tune `model` in place on completion tokens and return it (params float32, placed on `mesh`).

    With `checkpoint_dir`, a checkpoint of the same run found there is resumed (same examples and
    trajectory settings; anything else is a clear error), and calling again after completion just
    loads the final params. `epoch_end_callback(epoch, model_copy)` runs after each epoch trained in
    this call (not for epochs finished before a resume: use `save_epoch_params` snapshots for those).
    A LoRA model (`undo_jax.models.lora.apply_lora`) trains its adapters only; its checkpoints hold them and a
    pointer to the base (`base_source`, recorded as given, and a fingerprint checked on resume).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("train: the dataset is empty (no examples)")
    seqs, skipped = data_lib.tokenize_examples(tokenizer, examples, config)
    if skipped:
        log.warning("train: skipped %d of %d examples whose prompt exceeds max_length=%d",
                    len(skipped), len(examples), config.max_length)
    if not seqs:
        raise ValueError(f"train: all {len(examples)} examples were skipped: every prompt exceeds "
                         f"max_length={config.max_length}")
    return train_tokenized(model, seqs, config, mesh=mesh, checkpoint_dir=checkpoint_dir, log_path=log_path,
                           epoch_end_callback=epoch_end_callback, skipped=len(skipped), base_source=base_source)


def train_tokenized(
    model: nnx.Module,
    seqs: Sequence[data_lib.TokenizedExample],
    config: TrainConfig,
    *,
    mesh=None,
    checkpoint_dir=None,
    log_path=None,
    epoch_end_callback: EpochCallback | None = None,
    skipped: int = 0,
    on_policy: OnPolicyTeacher | None = None,
    base_source: str | None = None,
) -> nnx.Module:
    """`train` on already tokenized examples (ids + completion start).

    on_policy: with examples that carry teacher targets, train a `config.on_policy_fraction` of the steps on the
    student's own samples scored by this teacher (`undo_jax.train.on_policy`); the others as given.
    """
    if not seqs:
        raise ValueError("train: the dataset is empty (no examples)")
    if on_policy is not None and seqs[0].teacher is None:
        raise ValueError("train: on-policy distillation needs examples with teacher targets (the off-policy steps "
                         "train on them)")
    mesh = make_mesh() if mesh is None else mesh
    primary = jax.process_index() == 0
    row_multiple = batch_row_multiple(mesh)
    check_rows_fit_mesh(config.micro_batch, mesh, what="train: micro_batch")
    per_epoch = data_lib.steps_per_epoch(len(seqs), config.batch_size)
    total_steps = config.epochs * per_epoch
    data_fingerprint = data_lib.fingerprint(seqs)

    # ---- functional view of the model
    graphdef, params_host, frozen_host, params_sh, frozen_sh = functional_view(model, config.compute_dtype, mesh)
    shapes = param_shapes(params_host)
    distill = seqs[0].teacher is not None  # logit distillation (data._fill checks every example agrees)
    steps = _step_programs(graphdef, config, total_steps, mesh, params_host, params_sh, frozen_sh, distill=distill)
    tx, opt_sh, batch_sh = steps.tx, steps.opt_sh, steps.batch_sh
    rep = replicated(mesh)
    frozen = jax.device_put(frozen_host, frozen_sh)  # no copy when the base already lives there

    # ---- initial or restored state
    def fresh_state():
        # Copies (never aliases) the model's arrays: the state is donated step after step.
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_sh)(params_host)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32), rep)}

    run_meta = {"data_fingerprint": data_fingerprint, "num_examples": len(seqs),
                "trajectory": trajectory_settings(config, on_policy is not None), "param_shapes": shapes}
    base = base_pointer(model, base_source)
    if base is not None:
        run_meta["base"] = base
    ckpt = TrainCheckpointer(checkpoint_dir, config.keep) if checkpoint_dir is not None else None
    start = 0
    try:
        latest = ckpt.latest_step() if ckpt is not None else None
        if latest is not None:
            meta = ckpt.read_meta(latest)
            where = str(Path(checkpoint_dir) / "state" / str(latest))
            check_shapes(shapes, meta["param_shapes"], where)
            if meta["data_fingerprint"] != data_fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint at {where} was written for other training data ({meta['num_examples']} examples, "
                    f"fingerprint {meta['data_fingerprint'][:12]}) than this call ({len(seqs)} examples, "
                    f"{data_fingerprint[:12]}): use another checkpoint_dir"
                )
            if base is not None and meta.get("base", {}).get("fingerprint") != base["fingerprint"]:
                raise CheckpointMismatchError(
                    f"checkpoint at {where} holds LoRA adapters trained on another base model (recorded base: "
                    f"{meta.get('base', {}).get('source')!r}): load that base or use another checkpoint_dir"
                )
            if meta["trajectory"] != run_meta["trajectory"]:
                now = run_meta["trajectory"]
                changed = sorted(k for k in now if meta["trajectory"].get(k) != now[k])
                raise CheckpointMismatchError(
                    f"checkpoint at {where} was written with other training settings ({', '.join(changed)}): "
                    f"use another checkpoint_dir"
                )
            abstract = {"params": abstract_like(params_host, params_sh),
                        "opt_state": abstract_like(steps.opt_shapes, opt_sh),
                        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
            state = ckpt.restore(latest, abstract)
            start = int(latest)
            log.info("train: resumed from %s at step %d of %d", where, start, total_steps)
        else:
            state = fresh_state()

        log_file = Path(log_path) if log_path is not None and primary else None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            _rewrite_log(log_file, start)
            if start == 0:
                with log_file.open("a") as f:
                    f.write(json.dumps({"step": 0, "event": "start", "examples": len(seqs), "skipped_overlong": skipped,
                                        "steps": total_steps, "steps_per_epoch": per_epoch,
                                        "mesh": dict(mesh.shape), "config": config.to_dict()}) + "\n")

        def snapshot_model(params) -> nnx.Module:
            """A separate model holding a copy of `params` (the state's own buffers get donated)."""
            copied = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=params_sh)(params)
            clone = nnx.merge(*nnx.split(model))  # same graph, original compute dtype
            nnx.update(clone, copied)
            return clone

        def save(step: int, state):
            meta = dict(run_meta, step=step, epoch=step // per_epoch, step_in_epoch=step % per_epoch,
                        examples_seen=min(step * config.batch_size, total_steps * config.batch_size),
                        seed=config.seed)
            ckpt.save(step, state, meta)

        progress = _Progress(config.progress and primary, total_steps, start)
        try:
            for step in range(start, total_steps):
                t0 = time.perf_counter()
                indices = data_lib.step_example_indices(len(seqs), config, step)
                step_seqs = [seqs[i] for i in indices]
                sampled = on_policy is not None and is_on_policy_step(config, step)
                if sampled:
                    step_seqs, sample_info = student_samples(snapshot_model(state["params"]), on_policy, step_seqs,
                                                             config, step, mesh=mesh)
                batches = data_lib.step_micro_batches(step_seqs, config, row_multiple)
                placed = [place_batch(b, batch_sh) for b in batches]
                if len(placed) == 1:
                    state, metrics = steps.single(state, placed[0], frozen)
                else:
                    acc = steps.first(state["params"], placed[0], frozen)
                    for mb in placed[1:]:
                        acc = steps.add(state["params"], acc, mb, frozen)
                    state, metrics = steps.apply(state, acc)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t0
                real_tokens = int(sum(int((b.segment_ids > 0).sum()) for b in batches))
                padded_tokens = int(sum(b.tokens.size for b in batches))
                record = {"step": step + 1, "epoch": step / per_epoch + 1 / per_epoch, "loss": metrics["loss"],
                          "tokens": real_tokens, "completion_tokens": int(metrics["tokens"]),
                          "padded_tokens": padded_tokens, "examples": len(indices), "micro_batches": len(batches),
                          "tokens_per_s": real_tokens / elapsed, "lr": metrics["lr"],
                          "grad_norm": metrics["grad_norm"], "step_time_s": elapsed}
                if on_policy is not None:
                    record["on_policy"] = sampled
                    if sampled:
                        record.update(sample_info)
                if log_file is not None:
                    with log_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                progress.update(record)

                done = step + 1
                epoch_end = done % per_epoch == 0
                if epoch_end:
                    epoch = done // per_epoch
                    # Snapshot before the state checkpoint: a resume past this epoch end implies the snapshot exists.
                    if config.save_epoch_params and checkpoint_dir is not None:
                        target = epoch_params_dir(checkpoint_dir, epoch)
                        if not (target / "params").exists():
                            snapshot_meta = {"param_shapes": shapes, "epoch": epoch, "step": done}
                            if base is not None:
                                snapshot_meta["base"] = base
                            save_params(state["params"], target, snapshot_meta, overwrite=False)
                    if epoch_end_callback is not None:
                        epoch_end_callback(epoch, snapshot_model(state["params"]))
                if ckpt is not None and (epoch_end or done == total_steps
                                         or (config.save_every and done % config.save_every == 0)):
                    save(done, state)
        finally:
            progress.close()
    finally:
        if ckpt is not None:
            ckpt.close()

    nnx.update(model, state["params"])
    return model


def completion_loss(model: nnx.Module, tokenizer, examples: Sequence[Example], config: TrainConfig, *,
                    mesh=None) -> dict:
    """Mean completion-token loss of `model` on `examples` (no update), batched as `train` would batch them.

    Returns {"loss", "completion_tokens", "examples", "skipped_overlong"}.
    """
    seqs, skipped = data_lib.tokenize_examples(tokenizer, list(examples), config)
    if not seqs:
        raise ValueError("completion_loss: no examples to score")
    mesh = make_mesh() if mesh is None else mesh
    row_multiple = batch_row_multiple(mesh)
    graphdef, params, frozen, params_sh, frozen_sh = functional_view(model, config.compute_dtype, mesh)
    batch_sh = batch_sharding(mesh)

    def loss_sum(p, f, batch):
        return completion_loss_sum(nnx.merge(graphdef, p, f), batch, chunk=config.loss_chunk)

    fn = jax.jit(loss_sum, in_shardings=(params_sh, frozen_sh, dict.fromkeys(BATCH_KEYS, batch_sh)))
    params, frozen = jax.device_put(params, params_sh), jax.device_put(frozen, frozen_sh)
    total, count = 0.0, 0.0
    for first in range(0, len(seqs), config.batch_size):
        for batch in data_lib.step_micro_batches(seqs[first: first + config.batch_size], config, row_multiple):
            s, c = fn(params, frozen, place_batch(batch, batch_sh))
            total, count = total + float(s), count + float(c)
    return {"loss": total / count, "completion_tokens": int(count), "examples": len(seqs),
            "skipped_overlong": len(skipped)}
