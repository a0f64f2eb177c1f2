"""The bytes of one snapshot segment: a header, k data chunks, m parity cells.

A keeper holds, per (job, rank, buffer slot), one shared-memory segment laid out as

    [header: HEADER_BYTES][data chunk 0 .. k-1: L bytes each][parity cell 0 .. m-1: L bytes each]

The data chunks are the rank's *payload* (payload.py: an index and the records' bytes), padded
with zeros to k * L. The parity cells are parity chunks of other ranks' stripes (topology.py says
which), computed by the codec. L (``chunk``) is the same for every rank of a coding group, so
that the cells of one stripe have one length.

The header is JSON behind a magic, its length and its crc32, rewritten in place at three moments:
``invalid()`` before the slot is overwritten, with ``step`` once the data chunks are complete
(each chunk's crc32 in ``crcs``), with ``parity_step`` once the parity cells are. A torn header
fails its crc32 and reads as no snapshot, so a reader never takes half-written bytes for a step.
Nothing here imports torch: the keeper and ``offload snapshot status`` read headers too.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from offload.utils import crc

MAGIC = b"OFFSNAP\x01"
HEADER_BYTES = 64 << 10
"""Bytes reserved for the header: room for the crc32s of a few thousand chunks and cells."""
ALIGN = 4096
"""L is a multiple of this: chunk boundaries fall on pages."""

_PREFIX = struct.Struct("<8sII")  # magic, JSON length, crc32 of the JSON


@dataclass(frozen=True, slots=True)
class Cell:
    """One parity cell a segment holds: parity ``j`` of stripe ``stripe``."""

    stripe: int
    j: int
    crc: int
    members: tuple[int, ...]
    """crc32 of each data chunk of the stripe (member order): a rebuilt chunk is checked with it."""


@dataclass(frozen=True, slots=True)
class Header:
    job: str
    rank: int
    world: int
    group: tuple[int, ...]
    """Global ranks of the coding group, by node index (one rank per node)."""
    node: int
    """This rank's node index in ``group``."""
    m: int
    chunk: int
    """L: bytes of each data chunk and parity cell."""
    step: int = -1
    """The training step whose data chunks are complete here (-1: none)."""
    crcs: tuple[int, ...] = ()
    """crc32 of each data chunk (k of them)."""
    payload: int = 0
    """Bytes of the payload before the zero padding."""
    parity_step: int = -1
    """The step whose parity cells are complete here (-1: none)."""
    cells: tuple[Cell, ...] = field(default=())

    @property
    def k(self) -> int:
        return len(self.group) - self.m

    @property
    def nbytes(self) -> int:
        """Bytes of the whole segment."""
        return segment_bytes(self.k, self.m, self.chunk)

    def invalid(self) -> Header:
        """This header with nothing committed (written before the slot is overwritten)."""
        return replace(self, step=-1, crcs=(), payload=0, parity_step=-1, cells=())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Header:
        cells = tuple(Cell(c["stripe"], c["j"], c["crc"], tuple(c["members"])) for c in d.get("cells", ()))
        return cls(
            job=d["job"],
            rank=d["rank"],
            world=d["world"],
            group=tuple(d["group"]),
            node=d["node"],
            m=d["m"],
            chunk=d["chunk"],
            step=d.get("step", -1),
            crcs=tuple(d.get("crcs", ())),
            payload=d.get("payload", 0),
            parity_step=d.get("parity_step", -1),
            cells=cells,
        )


def segment_bytes(k: int, m: int, chunk: int) -> int:
    return HEADER_BYTES + (k + m) * chunk


def chunk_bytes(payload: int, k: int) -> int:
    """L for a payload of this many bytes cut into k chunks."""
    per = -(-max(payload, 1) // k)
    return -(-per // ALIGN) * ALIGN


def data_range(k: int, chunk: int, i: int) -> tuple[int, int]:
    """Byte range of data chunk i in the segment."""
    lo = HEADER_BYTES + i * chunk
    return lo, lo + chunk


def cell_range(k: int, chunk: int, j: int) -> tuple[int, int]:
    """Byte range of parity cell j in the segment."""
    return data_range(k, chunk, k + j)


def encode_header(h: Header) -> bytes:
    raw = json.dumps(h.to_json(), separators=(",", ":")).encode()
    if _PREFIX.size + len(raw) > HEADER_BYTES:
        raise ValueError(f"a snapshot header of {len(raw)} bytes does not fit in {HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(raw), zlib.crc32(raw)) + raw


def write_header(buf: Any, h: Header) -> None:
    """Writes h at the start of buf (a writable buffer of the segment)."""
    raw = encode_header(h)
    memoryview(buf)[: len(raw)] = raw


def read_header(buf: Any) -> Header | None:
    """The header at the start of buf, or None when there is none (never written, torn, foreign)."""
    view = memoryview(buf)
    if len(view) < _PREFIX.size:
        return None
    magic, n, want = _PREFIX.unpack(view[: _PREFIX.size])
    if magic != MAGIC or n > HEADER_BYTES - _PREFIX.size:
        return None
    raw = bytes(view[_PREFIX.size : _PREFIX.size + n])
    if zlib.crc32(raw) != want:
        return None
    try:
        return Header.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def crc_chunks(buf: Any, k: int, chunk: int, first: int = 0, count: int | None = None) -> list[int]:
    """crc32 of chunks first .. first+count of the segment (data chunks, then parity cells)."""
    view = memoryview(buf)
    n = k - first if count is None else count
    out = []
    for i in range(first, first + n):
        lo, hi = data_range(k, chunk, i)
        out.append(crc.crc32(view[lo:hi]))
    return out


def good_chunks(buf: Any, h: Header) -> list[int]:
    """Indices of the data chunks whose bytes match the header's crc32s (none if no step)."""
    if h.step < 0 or len(h.crcs) != h.k:
        return []
    return [i for i, (a, b) in enumerate(zip(crc_chunks(buf, h.k, h.chunk), h.crcs)) if a == b]


def good_cells(buf: Any, h: Header) -> list[int]:
    """Indices j of the parity cells whose bytes match their crc32s (none if no parity step)."""
    if h.parity_step < 0 or len(h.cells) != h.m:
        return []
    sums = crc_chunks(buf, h.k, h.chunk, first=h.k, count=h.m)
    return [c.j for c, s in zip(h.cells, sums) if c.crc == s]


def summary(h: Header | None, sizes: Sequence[int] = ()) -> dict[str, Any]:
    """A header as plain data for ``offload snapshot status`` (None: an empty slot)."""
    if h is None:
        return {"step": -1}
    return {
        "step": h.step,
        "parity_step": h.parity_step,
        "payload": h.payload,
        "k": h.k,
        "m": h.m,
        "chunk": h.chunk,
        "node": h.node,
        "nodes": len(h.group),
        "world": h.world,
        "cells": [[c.stripe, c.j] for c in h.cells],
        **({"bytes": sizes[0]} if sizes else {}),
    }
