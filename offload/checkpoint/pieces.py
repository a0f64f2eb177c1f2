"""Where a checkpoint tensor's bytes are: one whole tensor in one file, or pieces in several.

A manifest entry of format version 1 (and every tensor of a record that was not sharded) names one
file and offset: the whole tensor. A tensor of a sharded record saved by several ranks (format
version 2) lists its ``shards``: each rank wrote the range of the flattened tensor's elements that
fell into its shard of the record's flat buffer, as a 1-D tensor of the same key in its own file::

    "master/model.layers.0.mlp.up_proj.weight": {
        "dtype": "F32", "shape": [96, 48], "nbytes": 18432,
        "shards": [
            {"rank": 0, "range": [0, 2048], "file": "block.0.rank00000.safetensors",
             "offset": 1024, "nbytes": 8192, "crc32": 123},
            {"rank": 1, "range": [2048, 4608], "file": "block.0.rank00001.safetensors", ...}]}

``pieces()`` gives both kinds as the same ``Piece`` list, so that verify, load, export and diff
read either; ``Files.read`` fills elements [lo, hi) of a tensor from exactly the pieces that hold
them, with positioned reads of those bytes only (a rank loading its shard never reads the rest of
a block). Torch-free: ``offload ckpt`` imports it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offload.checkpoint.format import DTYPE_SIZES

NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements [lo, hi) of a tensor's flattened elements, stored under ``key`` in ``file`` at
    ``offset`` as a tensor of ``shape`` (the whole shape, or [hi - lo] for a shard)."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: int | None
    lo: int
    hi: int
    rank: int | None  # the rank that wrote it; None: a whole tensor


def numel(entry: dict[str, Any]) -> int:
    return math.prod(entry.get("shape", []))


def is_sharded(entry: dict[str, Any]) -> bool:
    return "shards" in entry


def pieces(key: str, entry: dict[str, Any]) -> list[Piece]:
    """The pieces of the tensor key, in element order."""
    dtype = str(entry.get("dtype"))
    if not is_sharded(entry):
        shape = tuple(entry.get("shape", []))
        return [
            Piece(key, str(entry.get("file")), dtype, shape, entry.get("offset", 0),
                  entry.get("nbytes", 0), entry.get("crc32"), 0, math.prod(shape), None)
        ]  # fmt: skip
    out = []
    for s in entry["shards"]:
        lo, hi = s["range"]
        out.append(
            Piece(key, str(s.get("file")), dtype, (hi - lo,), s.get("offset", 0), s.get("nbytes", 0),
                  s.get("crc32"), lo, hi, s.get("rank"))
        )  # fmt: skip
    return sorted(out, key=lambda p: p.lo)


def tiling_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with a sharded entry's ranges and sizes (they must cover the tensor's elements
    in order, once each), or None."""
    size = DTYPE_SIZES.get(str(entry.get("dtype")), 0)
    at = 0
    for p in pieces("", entry):
        if p.lo != at or p.hi < p.lo:
            return f"shard ranges do not cover the tensor: range [{p.lo}, {p.hi}) after element {at}"
        if p.nbytes != (p.hi - p.lo) * size:
            return f"shard of rank {p.rank}: nbytes does not match its range"
        at = p.hi
    if at != numel(entry):
        return f"shard ranges end at element {at}, the tensor has {numel(entry)}"
    return None


class Files:
    """Open files of one checkpoint directory, read by position. A context manager."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[str, int] = {}

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, key: str, entry: dict[str, Any], lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Elements [lo, hi) (default: all) of the tensor key's flattened elements, read from the
        pieces that hold them (those bytes only)."""
        hi = numel(entry) if hi is None else hi
        dtype = np.dtype(NUMPY_DTYPES[str(entry["dtype"])])
        out = np.empty(hi - lo, dtype=dtype)
        for p in pieces(key, entry):
            a, b = max(lo, p.lo), min(hi, p.hi)
            if a < b:
                self._pread(p.file, out[a - lo : b - lo], p.offset + (a - p.lo) * dtype.itemsize)
        return out

    def _pread(self, file: str, into: np.ndarray, offset: int) -> None:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.root / file, os.O_RDONLY)
        view = memoryview(into.view(np.uint8).data)
        while view.nbytes:
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                raise OSError(f"{self.root / file}: file ends before byte {offset + view.nbytes}")
            view, offset = view[n:], offset + n
