"""The student side of the loop: load a student from any source, and score it on records, resumably.

A student source is a HF directory, a .gguf file, a hub id, a symbolic SmolLM2 name, or a run's
iteration (`RUN/iter_K`, restored from its Orbax checkpoint into the run's base student). Evaluation
persists finished chunks of questions as it goes (`<out>.partial.jsonl`), so a kill loses at most one
chunk; chunk boundaries and sampling seeds are fixed, so a resumed evaluation equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from undo_jax.config import EvalSettings, resolve_student
from undo_jax.errors import one_line
from undo_jax.tasks.base import summarize
from undo_jax.undo.rundir import append_jsonl_durable, atomic_write_jsonl, read_jsonl


class StudentError(RuntimeError):
    """A student source that cannot be loaded (message: one line naming the source)."""


def run_iteration_dir(source: str) -> tuple[Path, int] | None:
    """(run root, K) when `source` is a run's iteration directory RUN/iter_K, else None."""
    from undo_jax.preflight import run_iteration

    return run_iteration(source)


def _run_identity(run_root: Path) -> dict:
    return json.loads((run_root / "identity.json").read_text(encoding="utf-8"))


def run_base_student(run_root: Path) -> str:
    return str(_run_identity(run_root)["student"])


def run_lora_settings(run_root: Path):
    """The LoRA settings a run trained its student with (None: full fine-tuning, or a run from before LoRA)."""
    from undo_jax.config import StudentConfig

    identity = _run_identity(run_root)
    defaults = StudentConfig()
    keys = ("lora_rank", "lora_alpha", "lora_targets", "lora_base_dtype")
    return StudentConfig(**{k: identity.get(k, getattr(defaults, k)) for k in keys}).lora_settings()


def load_model(source: str, *, param_dtype: str = "float32", mesh=None, attention: str = "auto", lora=None,
               seed: int = 0):
    """A CausalLM from a student source (not a run iteration); with `lora` (LoRASettings), adapters added."""
    from undo_jax.models import load_pretrained
    from undo_jax.models.lora import apply_lora

    resolved = resolve_student(source)
    try:
        # With a mesh each tensor goes straight to its sharded placement (never the whole model twice on host).
        model = load_pretrained(resolved, dtype=param_dtype, mesh=mesh, attention=attention)
    except (OSError, ValueError, KeyError) as e:
        raise StudentError(f"{source}: cannot load the student ({type(e).__name__}: {one_line(e)})") from None
    if lora is None:
        return model
    try:
        apply_lora(model, lora, seed=seed)
    except ValueError as e:
        raise StudentError(f"{source}: {one_line(e)}") from None
    if mesh is not None:
        from undo_jax.sharding import shard_model

        shard_model(model, mesh)  # the new adapters and quantised weights onto their placements
    return model


def load_tokenizer(source: str):
    from undo_jax.models import load_tokenizer as _load

    try:
        return _load(resolve_student(source))
    except (OSError, ValueError, KeyError) as e:
        raise StudentError(f"{source}: cannot load the tokenizer ({type(e).__name__}: {one_line(e)})") from None


def restore_into(model, checkpoint_dir: str | os.PathLike):
    """Load the trained parameters of `checkpoint_dir` (the trainer's Orbax checkpoint) into `model`."""
    from undo_jax.train import CheckpointMismatchError, restore_model

    try:
        return restore_model(model, checkpoint_dir)
    except (FileNotFoundError, CheckpointMismatchError) as e:
        raise StudentError(f"{checkpoint_dir}: cannot restore the student ({one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
        raise StudentError(f"{checkpoint_dir}: checkpoint is corrupt or unreadable ({type(e).__name__}: "
                           f"{one_line(e)})") from None


def load_student(source: str, *, param_dtype: str = "float32", mesh=None, attention: str = "auto"):
    """(model, tokenizer) for any student source, including RUN/iter_K."""
    run = run_iteration_dir(source)
    if run is None:
        return load_model(source, param_dtype=param_dtype, mesh=mesh, attention=attention), load_tokenizer(source)
    root, k = run
    base = run_base_student(root)
    model = load_model(base, param_dtype=param_dtype, mesh=mesh, attention=attention,
                       lora=run_lora_settings(root) if k > 0 else None)
    if k > 0:
        restore_into(model, root / f"iter_{k}" / "checkpoint")
    return model, load_tokenizer(base)


def partial_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name.replace(".jsonl", "") + ".partial.jsonl")


def _score_one(task, record, texts: list[str], maj_k: int) -> dict[str, Any]:
    from undo_jax.sampling import majority_vote

    if maj_k == 1:
        prediction, completion = task.extract_answer(texts[0]), texts[0]
    else:
        prediction, index = majority_vote(texts, task.vote_key)
        completion = texts[index]
    row = {"id": record.id, "question": record.question, "answer": record.answer, "completion": completion,
           **task.judge(prediction, record)}
    if maj_k > 1:
        row["samples"] = texts
    return row


def evaluate_records(model, tokenizer, task, records, settings: EvalSettings, out_path: str | os.PathLike, *,
                     mesh=None, progress: bool = False, write: bool = True) -> dict[str, Any]:
    """Answer every record, write `out_path` (one row per record, in order) and return the summary.

    Finished chunks go to `<out>.partial.jsonl` first (appended and fsynced); a re-run skips them.
    Every process generates (the mesh spans them all); only the one with `write` touches files.
    """
    from undo_jax.sampling import generate

    out_path = Path(out_path)
    part = partial_path(out_path)
    done: dict[str, dict] = {}
    if part.is_file():
        for r in read_jsonl(part, tolerate_torn_tail=True):
            done[r["id"]] = r
        if write:  # drop a torn last line for good before appending after it
            atomic_write_jsonl(part, list(done.values()))
    records = list(records)
    greedy = settings.maj_k == 1
    for start in range(0, len(records), settings.chunk):
        chunk = records[start:start + settings.chunk]
        if all(r.id in done for r in chunk):
            continue
        outputs = generate(
            model, tokenizer, [task.prompt_messages(r) for r in chunk], max_new_tokens=settings.max_new_tokens,
            temperature=0.0 if greedy else settings.temperature, num_samples=settings.maj_k,
            seed=settings.seed + 7919 * (start // settings.chunk), batch_size=settings.batch_size, mesh=mesh,
            progress=progress, engine=settings.engine)
        rows = [_score_one(task, r, [c.text for c in comps], settings.maj_k)
                for r, comps in zip(chunk, outputs, strict=True)]
        new = [row for row in rows if row["id"] not in done]
        if write:
            append_jsonl_durable(part, new)
        done.update({row["id"]: row for row in new})
    ordered = [done[r.id] for r in records]
    if write:
        atomic_write_jsonl(out_path, ordered)
        if part.exists():
            part.unlink()
    return summarize(ordered)
