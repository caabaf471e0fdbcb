"""Minimal safetensors reader/writer on numpy memory maps.

Our own few lines instead of `safetensors.numpy` because that path cannot hold bfloat16 and
copies whole files; here every tensor is a zero-copy view of an mmap, so a loader can move one
tensor at a time to its device placement and never holds the model twice in host RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt or of an unsupported dtype."""


def read_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise SafetensorsError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {data_start + end}, file has {size})"
            )
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return header, data_start


class SafetensorsFile:
    """Lazy, memory-mapped tensors of one safetensors file: `f[name]` is a read-only numpy view."""

    def __init__(self, path: str):
        self.path = path
        self.header, self._start = read_header(path)

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
        if end == begin:
            return np.zeros(shape, dtype)
        # One map per tensor, not one per file: its pages leave the process's RSS as soon as the caller
        # drops the array, so a tensor-by-tensor loader never has the whole file resident next to the model.
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._start + begin, shape=shape)


@contextlib.contextmanager
def staged_dir(out_dir, *, what: str = "checkpoint"):
    """Yield a temporary sibling folder of `out_dir` to write into, renamed to `out_dir` when the block ends
    without error (removed otherwise): `out_dir` is never left half-written; a non-empty one is refused."""
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite a {what}")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temp file in the same folder, then rename)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype} to {path}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section, as the reference writer does
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in arrays:
                f.write(arr.tobytes(order="C"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
