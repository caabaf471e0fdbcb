"""Shared task machinery: the Record type, split carving, source resolution, and scoring.

A task subclass supplies three things: how to read its upstream rows (`_pools`), how to turn one row into a
Record (`_make_record`), and its answer rules (`extract_answer`, `is_correct`, prompts). Everything else
(split logic, validation carve, scoring with breakdowns) lives here so all four tasks behave alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from undo_jax.tasks.sources import TaskDataError, find_split_file, load_hub_rows, read_rows

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Record:
    """One benchmark item. Not hashable (meta is a dict): key collections by `id`."""

    id: str
    question: str
    answer: str
    rationale: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


Row = tuple[str, dict]  # (location "file:line" for error messages, upstream fields)


def require_fields(row: dict, fields: Sequence[str], where: str, task: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise TaskDataError(
            f"{where}: missing field {missing[0]!r} ({task} rows need {', '.join(fields)}; got {', '.join(row)})"
        )


def carve_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, deterministic sample of `size` out of `n` (numpy PCG64: stable across versions)."""
    if not 0 <= size <= n:
        raise ValueError(f"cannot carve {size} items from a pool of {n}")
    picked = np.random.default_rng(seed).permutation(n)[:size]
    return np.sort(picked)


def split_pool(records: list[Record], size: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(rest, carved) with `carved` a seeded sample of `size` records; both keep the pool's order."""
    idx = carve_indices(len(records), size, seed)
    chosen = np.zeros(len(records), dtype=bool)
    chosen[idx] = True
    rest = [r for r, c in zip(records, chosen, strict=True) if not c]
    carved = [r for r, c in zip(records, chosen, strict=True) if c]
    return rest, carved


def subsample(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """A seeded sample of `n` records in their original order (all of them if n >= len).

    Use this rather than a prefix: MATH and MMLU-Pro files are sorted by subject/category, so `records[:n]` of
    MATH is all algebra.
    """
    if n >= len(records):
        return list(records)
    return [records[i] for i in carve_indices(len(records), n, seed)]


class Task:
    """Base class; see CONTRACTS.md `undo_jax.tasks`. Subclasses set the class attributes below."""

    name: str = ""
    hf_dataset_id: str = ""
    hf_config: str | None = None
    # Folder under ../shared/data (or $UNDO_SHARED_DATA) holding this task's files in the upstream layout.
    default_source_hint: str = ""
    # Record.meta field used to group the score breakdown (None: no breakdown).
    breakdown_key: str | None = None
    answer_convention: str = ""

    def __init__(self) -> None:
        self._cache: dict[tuple, dict[str, list[Record]]] = {}

    # ----- loading -----------------------------------------------------------------------------------------
    def load(self, split: str, source: str | os.PathLike | None = None, *, val_size: int = 200,
             seed: int = 0) -> list[Record]:
        """Records of `split`. `validation` is a seeded carve of `val_size` from the train pool; `train` is the rest."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name}; expected one of {', '.join(SPLITS)}")
        pools = self._cached_pools(source, split)
        if split == "test":
            return list(pools["test"])
        pool = pools["train"]
        if not 0 <= val_size < len(pool):
            raise ValueError(f"val_size={val_size} must be in [0, {len(pool)}) for task {self.name} "
                             f"(train pool of {len(pool)})")
        train, validation = split_pool(pool, val_size, seed)
        return train if split == "train" else validation

    def _cached_pools(self, source, split: str) -> dict[str, list[Record]]:
        key = self._cache_key(source, split)
        if key not in self._cache:
            pools = self._pools(source, split)
            self._check_pools(pools, source)
            if pools.get("train") and pools.get("test"):
                # An upstream train item repeating a test question (MATH has one) would leak the test: drop it.
                test_questions = {r.question for r in pools["test"]}
                pools["train"] = [r for r in pools["train"] if r.question not in test_questions]
            self._cache[key] = pools
        return self._cache[key]

    def _cache_key(self, source, split: str) -> tuple:
        if source is None:
            return ("hub",)
        path = Path(source)
        stamp = path.stat().st_mtime_ns if path.exists() else None
        # A single file serves only the split asked for (train pool or test), so the split is part of the key.
        return (str(path.resolve()), stamp, split if path.is_file() else "")

    def _check_pools(self, pools: dict[str, list[Record]], source) -> None:
        for name, records in pools.items():
            ids = [r.id for r in records]
            if len(set(ids)) != len(ids):
                raise TaskDataError(f"{source or self.hf_dataset_id}: duplicate ids in the {name} pool of {self.name}")
        if pools.get("train") and pools.get("test"):
            overlap = {r.id for r in pools["train"]} & {r.id for r in pools["test"]}
            if overlap:
                raise TaskDataError(f"{source or self.hf_dataset_id}: {len(overlap)} ids in both train and test "
                                    f"of {self.name}, e.g. {sorted(overlap)[0]}")

    def _pools(self, source, split: str) -> dict[str, list[Record]]:
        """{'train': train pool, 'test': test}; with a single-file source only the pool `split` needs."""
        raise NotImplementedError

    def _make_record(self, row: dict, where: str) -> Record:
        raise NotImplementedError

    def _records(self, rows: list[Row]) -> list[Record]:
        return [self._make_record(row, where) for where, row in rows]

    def _rows_for(self, source, stems: Sequence[str], hub_split: str) -> list[Row]:
        """Rows of one upstream split: from the hub (source None), a folder (file found by stem) or a file."""
        if source is None:
            return load_hub_rows(self.hf_dataset_id, self.hf_config, hub_split)
        path = Path(source)
        if path.is_dir():
            return read_rows(find_split_file(path, stems))
        if path.is_file():
            return read_rows(path)
        raise FileNotFoundError(f"{path}: no such file or folder (source for task {self.name})")

    # ----- answers -------------------------------------------------------------------------------------------
    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        raise NotImplementedError

    def final_answer_line(self, answer: str) -> str:
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        raise NotImplementedError

    def is_correct(self, prediction: str | None, record: Record) -> bool:
        raise NotImplementedError

    def canonical_answer(self, prediction: str | None) -> str | None:
        """A normal form for maj@k voting: equal answers written differently vote together."""
        return prediction

    def vote_key(self, text: str) -> str | None:
        """extract_answer then canonical_answer: the `extract_fn` to hand to majority_vote."""
        return self.canonical_answer(self.extract_answer(text))

    def reference_rationale(self, record: Record) -> str | None:
        """The dataset's gold rationale, ending with this task's final-answer line (None if it has none).

        The one writer of reference rationales (the reference teacher, tests and benchmarks use it); tasks whose
        gold solutions need rewriting (GSM8K's calculator notes, SVAMP's equations) override it.
        """
        return self.with_final_line(record.rationale, record) if record.rationale else None

    def with_final_line(self, body: str, record: Record) -> str:
        """`body` ending with the final-answer line of `record`'s answer (added unless already there)."""
        body, final = body.rstrip(), self.final_answer_line(str(record.answer))
        if body.endswith(final):
            return body
        return f"{body}\n{final}" if body else final

    def group_of(self, record: Record) -> str | None:
        if self.breakdown_key is None:
            return None
        return str(record.meta.get(self.breakdown_key))

    def judge(self, prediction: str | None, record: Record) -> dict[str, Any]:
        """The scored fields of one answer: prediction, correct, and the record's group (if the task has one)."""
        row: dict[str, Any] = {"prediction": prediction, "correct": bool(self.is_correct(prediction, record))}
        group = self.group_of(record)
        if group is not None:
            row["group"] = group
        return row

    def score(self, completions: Sequence[str], records: Sequence[Record], *,
              extract: Callable[[str], str | None] | None = None) -> dict[str, Any]:
        """Accuracy (a fraction in [0, 1]) over paired completions and records, with a per-group breakdown."""
        if len(completions) != len(records):
            raise ValueError(f"score: {len(completions)} completions for {len(records)} records")
        extract = extract or self.extract_answer
        return summarize(self.judge(extract(text), record) for text, record in zip(completions, records, strict=True))


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and per-group breakdown of judged rows (each with "correct" and, maybe, "group")."""
    rows = list(rows)
    groups: dict[str, list[int]] = {}
    for r in rows:
        if "group" in r:
            tally = groups.setdefault(str(r["group"]), [0, 0])
            tally[0] += bool(r["correct"])
            tally[1] += 1
    n, correct = len(rows), sum(bool(r["correct"]) for r in rows)
    breakdown = {g: {"accuracy": c / t, "correct": c, "n": t} for g, (c, t) in sorted(groups.items())}
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "breakdown": breakdown}
