"""Reading upstream rows from local files (jsonl, json, parquet) or the Hugging Face hub.

Every row comes with a location string ("file:line", "file: item 3", "file: row 3") so that a bad row
produces an error naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".parquet")


class TaskDataError(ValueError):
    """A data file or row is not in the layout a task expects."""


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise TaskDataError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})")


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # tolerate a byte-order mark
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON array of objects")
    rows = []
    for i, row in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise TaskDataError(f"{path}: cannot read parquet ({e})") from None
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]


def find_split_file(folder: Path, stems: Sequence[str]) -> Path:
    """The first file named `<stem>.<jsonl|json|parquet>` or `<stem>-*.parquet` in `folder` or one level below."""
    dirs = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for stem in stems:
        for d in dirs:
            for suffix in SUFFIXES:
                candidate = d / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
            shards = sorted(d.glob(f"{stem}-*.parquet"))
            if len(shards) == 1:
                return shards[0]
    wanted = ", ".join(f"{s}.jsonl" for s in stems)
    raise TaskDataError(f"{folder}: no data file found (looked for {wanted} or .json/.parquet variants)")


def load_hub_rows(dataset_id: str, config: str | None, split: str) -> list[tuple[str, dict]]:
    """Rows of a hub dataset split via `datasets` (hub ids only; local files never go through here)."""
    import datasets

    ds = datasets.load_dataset(dataset_id, config, split=split)
    label = f"{dataset_id}{'/' + config if config else ''}[{split}]"
    return [(f"{label} row {i}", dict(row)) for i, row in enumerate(ds)]
