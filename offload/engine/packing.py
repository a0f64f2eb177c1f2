"""One group of tensors as one byte buffer, and back, exactly (for activation offload).

A group is what one block leaves for its backward: its boundary inputs, or the tensors its
autograd graph saved. It moves as one buffer, so one copy (one DMA, one file write) moves it.
Storages are deduplicated as SSDTrain does: tensors that view one storage move the span of that
storage they cover, once, and come back as views of one storage again. A storage whose views
cover less than half of their span (a small slice of a large buffer) moves each view on its own
instead, densely. Every tensor is rebuilt with its shape, stride, dtype and, relative to a
64-byte boundary, its address, so kernels see the same layout as in forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALIGN = 64
"""Byte alignment of each piece in the buffer (and of a span's start within its storage)."""


def storage_key(t: torch.Tensor) -> int:
    """Identifies t's storage (also on the meta device, where every data pointer is 0): the
    address of its StorageImpl, stable while the tensor lives."""
    return int(t.untyped_storage()._cdata)


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _extent(t: torch.Tensor) -> int:
    """Elements of storage that t reaches, from its first element on."""
    if t.numel() == 0:
        return 0
    return 1 + sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride()))


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes [start, start + nbytes) of the buffer: a span of one storage, or one tensor moved
    densely (``dense``)."""

    start: int
    nbytes: int
    dense: bool


@dataclass(frozen=True, slots=True)
class Placed:
    """How to rebuild one tensor from the buffer."""

    piece: int
    """Index of its piece; -1 for a tensor with no elements (rebuilt empty)."""
    offset: int
    """Storage offset in elements of dtype from the start of the buffer (span pieces)."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class Packing:
    """The layout of one group: where each tensor's bytes go in a buffer of ``nbytes``.

    ``sources`` holds what the copy out reads; drop them (``forget_sources``) once the copy has
    been queued, so the group's device memory can be freed.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.pieces: list[Piece] = []
        self.placed: list[Placed] = []
        self.sources: list[torch.Tensor] = []
        self.nbytes = 0
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(storage_key(t), []).append(i)
        placed: dict[int, Placed] = {}
        for members in groups.values():
            placed.update(self._place_storage([tensors[i] for i in members], members))
        self.placed = [placed[i] for i in range(len(tensors))]

    def _place_storage(self, views: list[torch.Tensor], members: list[int]) -> dict[int, Placed]:
        live = [(i, t) for i, t in zip(members, views) if t.numel() > 0]
        out = {i: Placed(-1, 0, tuple(t.shape), t.stride(), t.dtype) for i, t in zip(members, views)}
        if not live:
            return out
        starts = [int(t.storage_offset()) * t.element_size() for _, t in live]
        ends = [b + _extent(t) * t.element_size() for b, (_, t) in zip(starts, live)]
        lo, hi = min(starts) // ALIGN * ALIGN, max(ends)
        distinct = {(b, tuple(t.shape), t.stride(), t.dtype): t for b, (_, t) in zip(starts, live)}
        if hi - lo <= 2 * sum(t.numel() * t.element_size() for t in distinct.values()):
            piece = self._add(hi - lo, _bytes_of(live[0][1], lo, hi - lo), dense=False)
            base = self.pieces[piece].start
            for b, (i, t) in zip(starts, live):
                out[i] = Placed(
                    piece, (base + b - lo) // t.element_size(), tuple(t.shape), t.stride(), t.dtype
                )
            return out
        moved: dict[tuple, int] = {}
        for b, (i, t) in zip(starts, live):
            key = (b, tuple(t.shape), t.stride(), t.dtype)
            if key not in moved:
                moved[key] = self._add(t.numel() * t.element_size(), t, dense=True)
            out[i] = Placed(moved[key], 0, tuple(t.shape), t.stride(), t.dtype)
        return out

    def _add(self, nbytes: int, source: torch.Tensor, dense: bool) -> int:
        self.pieces.append(Piece(self.nbytes, nbytes, dense))
        self.sources.append(source)
        self.nbytes = _align(self.nbytes + nbytes)
        return len(self.pieces) - 1

    def copy_out(self, buf: torch.Tensor) -> None:
        """Queues the copy of every piece into buf (uint8, at least nbytes) on the current stream."""
        for piece, src in zip(self.pieces, self.sources):
            dst = buf[piece.start : piece.start + piece.nbytes]
            if piece.dense:
                dst.view(src.dtype).view(src.shape).copy_(src, non_blocking=True)
            else:
                dst.copy_(src, non_blocking=True)

    def forget_sources(self) -> None:
        self.sources = []

    def rebuild(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """The group's tensors over buf (uint8 holding the packed bytes, storage offset 0):
        views of it for span pieces, fresh tensors with the original strides for dense ones."""
        out = []
        storage = buf.untyped_storage()
        for p in self.placed:
            if p.piece < 0:
                out.append(torch.empty_strided(p.shape, p.stride, dtype=p.dtype, device=buf.device))
                continue
            piece = self.pieces[p.piece]
            if piece.dense:
                t = torch.empty_strided(p.shape, p.stride, dtype=p.dtype, device=buf.device)
                t.copy_(buf[piece.start : piece.start + piece.nbytes].view(p.dtype).view(p.shape))
            else:
                t = torch.empty(0, dtype=p.dtype, device=buf.device).set_(
                    storage, p.offset, p.shape, p.stride
                )
            out.append(t)
        return out


def _bytes_of(t: torch.Tensor, lo: int, nbytes: int) -> torch.Tensor:
    """Bytes [lo, lo + nbytes) of t's storage as a uint8 tensor (a view, not a copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage(), lo, (nbytes,), (1,))
