"""verify(path): every tensor's crc32 and the manifest's consistency, without torch.

Checks that the manifest indexes every parameter's three tensors, that each tensor (or each of
its shards, pieces.py) sits in its file where the file's own safetensors header says (dtype,
shape, offset, size), that a sharded tensor's shards cover it once, that no file is cut short,
and that each tensor's (or shard's) bytes have the crc32 the writer recorded. ``only`` limits the
crc32 sums, the expensive part, to the pieces a caller will read (load() on one rank of several:
its shards only); the rest is checked for every file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from offload.checkpoint.format import (
    DTYPE_SIZES,
    KINDS,
    MANIFEST,
    CheckpointError,
    Problem,
    read_header,
    read_manifest,
    tensor_key,
)
from offload.checkpoint.pieces import Piece, is_sharded, pieces, tiling_problem
from offload.utils import crc as crc_mod

CHUNK = 16 << 20  # bytes read at a time when summing a tensor


def verify(path: str | os.PathLike[str], only: Collection[tuple[str, str]] | None = None) -> list[Problem]:
    """Problems with the checkpoint directory path; an empty list means it is good. only: the
    (file, tensor key) pieces whose crc32 is summed (default: every one)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return [Problem(MANIFEST, None, str(e))]
    tensors: dict[str, dict[str, Any]] = manifest.get("tensors", {})
    problems = _check_index(manifest, tensors)
    by_file: dict[str, list[Piece]] = {}
    for key, entry in tensors.items():
        if is_sharded(entry) and tiling_problem(entry) is not None:
            continue  # reported by _check_index
        for piece in pieces(key, entry):
            by_file.setdefault(piece.file, []).append(piece)
    for file, found in sorted(by_file.items()):
        problems += _check_file(path, file, found, only)
    return problems


def _check_index(manifest: dict[str, Any], tensors: dict[str, dict[str, Any]]) -> list[Problem]:
    problems = []
    for name, info in manifest.get("params", {}).items():
        for kind in KINDS:
            key = tensor_key(kind, name)
            entry = tensors.get(key)
            if entry is None:
                problems.append(Problem(MANIFEST, key, "parameter's tensor missing from the index"))
            elif list(entry.get("shape", [])) != list(info.get("shape", [])):
                problems.append(Problem(MANIFEST, key, f"shape {entry.get('shape')} != {info.get('shape')}"))
    for key, entry in tensors.items():
        size = DTYPE_SIZES.get(entry.get("dtype", ""))
        if size is None:
            problems.append(Problem(MANIFEST, key, f"unknown dtype {entry.get('dtype')!r}"))
        elif math.prod(entry.get("shape", [])) * size != entry.get("nbytes"):
            problems.append(Problem(MANIFEST, key, "nbytes does not match dtype and shape"))
        elif is_sharded(entry) and (problem := tiling_problem(entry)) is not None:
            problems.append(Problem(MANIFEST, key, problem))
    return problems


def _check_file(
    root: Path, file: str, found: list[Piece], only: Collection[tuple[str, str]] | None
) -> list[Problem]:
    fpath = root / file
    if os.sep in file or file.startswith(".") or not fpath.is_file():
        return [Problem(file, found[0].key, "file missing")]
    try:
        header, data_start = read_header(fpath)
    except (OSError, ValueError) as e:
        return [Problem(file, found[0].key, f"unreadable header: {e}")]
    size = fpath.stat().st_size
    problems = []
    with open(fpath, "rb") as f:
        for piece in found:
            problem = _check_piece(header, data_start, size, piece)
            summed = only is None or (file, piece.key) in only
            if problem is None and summed and _crc32(f, piece.offset, piece.nbytes) != piece.crc32:
                problem = "crc32 mismatch: the tensor's bytes changed since it was written"
            if problem is not None:
                problems.append(Problem(file, piece.key, problem))
    return problems


def _check_piece(header: dict[str, Any], data_start: int, size: int, piece: Piece) -> str | None:
    h = header.get(piece.key)
    if not isinstance(h, dict):
        return "not in the file's header"
    begin, end = h.get("data_offsets", (None, None))
    if h.get("dtype") != piece.dtype or list(h.get("shape", [])) != list(piece.shape):
        return f"header says {h.get('dtype')} {h.get('shape')}, manifest {piece.dtype} {list(piece.shape)}"
    if data_start + begin != piece.offset or end - begin != piece.nbytes:
        return "offset or size differs between the file's header and the manifest"
    if piece.offset + piece.nbytes > size:
        return f"file truncated: tensor ends at byte {piece.offset + piece.nbytes}, file has {size}"
    return None


def _crc32(f: Any, offset: int, nbytes: int) -> int:
    f.seek(offset)
    crc, left = 0, nbytes
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        crc = crc_mod.update(chunk, crc)
        left -= len(chunk)
    return crc
