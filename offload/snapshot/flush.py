"""Snapshots on disk: a committed segment's data written to a file, and read back.

    ROOT/snap_000120/rank_0.snap     the header (parity left out) and the k data chunks, as in memory
    ROOT/snap_000120/rank_1.snap

Each rank's file is written under a temporary name, fsynced and renamed, so a file that exists is
whole; a step counts as flushed once every rank's file is there (``flushed_steps``). Ranks write
their own files (by ``Snapshotter.flush``, on SIGTERM, or ``offload snapshot flush`` on each node
from its keeper, even after the trainers died), so there is no step-wide manifest to agree on.

Unlike an ``offload.save`` checkpoint (whole parameters, loaded at any world size), a flushed
snapshot restores the run it came from, same model, placement and world size, each rank its own
state; it can be written from the keeper alone. The bytes are checked against the header's crc32s
as they are written and again when read. No torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from offload.snapshot import segment
from offload.snapshot.segment import Header
from offload.utils import crc

_DIR = re.compile(r"^snap_(\d+)$")
_FILE = re.compile(r"^rank_(\d+)\.snap$")


class FlushError(RuntimeError):
    """A snapshot that cannot be flushed or read back."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"snap_{step:06d}"


def rank_file(root: Path, step: int, rank: int) -> Path:
    return step_dir(root, step) / f"rank_{rank}.snap"


def write(buf: Any, h: Header, root: Path) -> Path:
    """Writes the committed data of a segment (buf: its bytes, h: its header) as this rank's file
    of step h.step. Raises FlushError if the bytes no longer match the header (the slot was being
    rewritten meanwhile) and leaves nothing behind then."""
    if h.step < 0:
        raise FlushError(f"rank {h.rank} holds no committed snapshot to flush")
    view = memoryview(buf)
    final = rank_file(root, h.step, h.rank)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:
            f.write(segment.encode_header(replace(h, parity_step=-1, cells=())))  # the data alone
            f.seek(segment.HEADER_BYTES)
            for i, want in enumerate(h.crcs):
                lo, hi = segment.data_range(h.k, h.chunk, i)
                if crc.update(view[lo:hi]) != want:
                    raise FlushError(
                        f"the snapshot of step {h.step} (rank {h.rank}) changed while it was flushed: "
                        "a newer one is being written; flush again"
                    )
                f.write(view[lo:hi])
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def read(path: Path) -> tuple[Header, bytearray]:
    """(header, data chunks) of a flushed file, checked against its crc32s."""
    raw = bytearray(path.read_bytes())
    h = segment.read_header(raw)
    if h is None or h.step < 0:
        raise FlushError(f"{path} is not a flushed snapshot (no valid header)")
    data = raw[segment.HEADER_BYTES :]
    if len(data) != h.k * h.chunk:
        raise FlushError(f"{path} is truncated: {len(data)} bytes of data, the header says {h.k * h.chunk}")
    for i, want in enumerate(h.crcs):
        if crc.update(memoryview(data)[i * h.chunk : (i + 1) * h.chunk]) != want:
            raise FlushError(f"{path}: data chunk {i} fails its crc32")
    return h, data


def flushed_steps(root: Path, world: int | None = None, rank: int | None = None) -> list[int]:
    """Steps under root, newest first, that hold every rank's file (world given), or this rank's."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        match = _DIR.match(d.name)
        if match is None or not d.is_dir():
            continue
        ranks = {int(f.group(1)) for f in (_FILE.match(p.name) for p in d.iterdir()) if f is not None}
        if (rank is None or rank in ranks) and (world is None or ranks >= set(range(world))):
            out.append(int(match.group(1)))
    return sorted(out, reverse=True)


def remove(root: Path, job: str, rank: int) -> list[Path]:
    """Deletes this rank's flushed files of job under root (the run is done: a later start must not
    restore them), and each step's directory once it is empty; returns the files deleted."""
    gone = []
    for step in flushed_steps(root, rank=rank):
        path = rank_file(root, step, rank)
        with open(path, "rb") as f:
            h = segment.read_header(f.read(segment.HEADER_BYTES))
        if h is not None and h.job == job:
            path.unlink(missing_ok=True)
            gone.append(path)
            with contextlib.suppress(OSError):  # another rank's file is still there
                path.parent.rmdir()
    return gone


def _fsync_dir(path: Path) -> None:  # checkpoint.writer has one too, but imports torch
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_keeper(client: Any, root: Path, job: str | None = None) -> list[Path]:
    """Writes the newest committed snapshot of each rank a keeper holds (client: a KeeperClient)
    under root; job: which job (None: the only one there). ``offload snapshot flush``."""
    newest: dict[tuple[str, int], tuple[int, int]] = {}
    for entry in client.list():
        h = entry["header"]
        if h is None or h.get("step", -1) < 0 or (job is not None and entry["job"] != job):
            continue
        key = (entry["job"], entry["rank"])
        newest[key] = max(newest.get(key, (-1, -1)), (h["step"], entry["slot"]))
    jobs = sorted({j for j, _ in newest})
    if not jobs:
        which = f"of job '{job}' " if job is not None else ""
        raise FlushError(f"the keeper in {client.dir} holds no committed snapshot {which}to flush")
    if len(jobs) > 1:
        raise FlushError(f"the keeper in {client.dir} holds snapshots of jobs {jobs}: choose one with --job")
    out = []
    for (name, rank), (_, slot) in sorted(newest.items()):
        seg = client.open(name, rank, slot)
        try:
            h = seg.header()
            if h is None:
                raise FlushError(f"the snapshot of rank {rank} changed while it was flushed: flush again")
            out.append(write(seg.mm, h, root))
        finally:
            seg.close()
    return out
