"""verify(path): every tensor's crc32 and the manifest's consistency, without torch.

Checks that the manifest indexes every parameter's three tensors, that each tensor sits in its
file where the file's own safetensors header says (dtype, shape, offset, size), that no file is
cut short, and that each tensor's bytes have the crc32 the writer recorded.
"""

from __future__ import annotations

import math
import os
import zlib
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

CHUNK = 16 << 20  # bytes read at a time when summing a tensor


def verify(path: str | os.PathLike[str]) -> list[Problem]:
    """Problems with the checkpoint directory path; an empty list means it is good."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return [Problem(MANIFEST, None, str(e))]
    tensors: dict[str, dict[str, Any]] = manifest.get("tensors", {})
    problems = _check_index(manifest, tensors)
    by_file: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, entry in tensors.items():
        by_file.setdefault(str(entry.get("file")), []).append((key, entry))
    for file, entries in sorted(by_file.items()):
        problems += _check_file(path, file, entries)
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
    return problems


def _check_file(root: Path, file: str, entries: list[tuple[str, dict[str, Any]]]) -> list[Problem]:
    fpath = root / file
    if os.sep in file or file.startswith(".") or not fpath.is_file():
        return [Problem(file, entries[0][0], "file missing")]
    try:
        header, data_start = read_header(fpath)
    except (OSError, ValueError) as e:
        return [Problem(file, entries[0][0], f"unreadable header: {e}")]
    size = fpath.stat().st_size
    problems = []
    with open(fpath, "rb") as f:
        for key, entry in entries:
            problem = _check_entry(header, data_start, size, key, entry)
            if problem is None and _crc32(f, entry["offset"], entry["nbytes"]) != entry.get("crc32"):
                problem = "crc32 mismatch: the tensor's bytes changed since it was written"
            if problem is not None:
                problems.append(Problem(file, key, problem))
    return problems


def _check_entry(
    header: dict[str, Any], data_start: int, size: int, key: str, entry: dict[str, Any]
) -> str | None:
    h = header.get(key)
    if not isinstance(h, dict):
        return "not in the file's header"
    begin, end = h.get("data_offsets", (None, None))
    if h.get("dtype") != entry.get("dtype") or list(h.get("shape", [])) != list(entry.get("shape", [])):
        return f"header says {h.get('dtype')} {h.get('shape')}, manifest {entry.get('dtype')} {entry.get('shape')}"
    if data_start + begin != entry.get("offset") or end - begin != entry.get("nbytes"):
        return "offset or size differs between the file's header and the manifest"
    if entry["offset"] + entry["nbytes"] > size:
        return f"file truncated: tensor ends at byte {entry['offset'] + entry['nbytes']}, file has {size}"
    return None


def _crc32(f: Any, offset: int, nbytes: int) -> int:
    f.seek(offset)
    crc, left = 0, nbytes
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc
