"""Free-list allocator over the offsets of one arena.

Pure bookkeeping: it hands out aligned offsets in ``[0, size)`` and never touches memory, torch or
arenas, so it can be tested (and property-tested) on its own. Free blocks are kept sorted by offset;
a freed block is merged with free neighbours at once, so the free list never holds two adjacent
blocks and freeing everything always leaves the single block ``(0, size)``.

Best fit is the default: the pool's leases are long-lived and of a few recurring sizes (one per
block and kind), and best fit keeps the large holes intact for the large ones. Sizes are rounded to
the alignment only, never to a power of two (the pinned-pool waste MemAscend points at).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

ALIGNMENT = 4096
"""Every offset and every block size is a multiple of this (O_DIRECT needs 4 KiB alignment)."""


class FitPolicy(enum.Enum):
    """Which free block a request is carved from."""

    FIRST = "first"
    """The lowest-addressed block that fits: fast, tends to fill the start of the arena."""
    BEST = "best"
    """The smallest block that fits (lowest address on ties): keeps large holes for large requests."""


@dataclass(frozen=True, slots=True)
class Block:
    """A run of bytes in the arena: ``[offset, offset + size)``."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return -(-nbytes // alignment) * alignment


class FreeListAllocator:
    """Aligned offsets in ``[0, size)`` from a coalescing free list. Not thread-safe: the owner locks."""

    def __init__(self, size: int, *, alignment: int = ALIGNMENT, policy: FitPolicy = FitPolicy.BEST) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a positive power of two, got {alignment}")
        if size <= 0 or size % alignment:
            raise ValueError(f"size must be a positive multiple of alignment {alignment}, got {size}")
        self._size = size
        self._alignment = alignment
        self._policy = policy
        # Parallel sorted lists (offsets, sizes) of free blocks: bisect finds a block's neighbours.
        self._free_offsets: list[int] = [0]
        self._free_sizes: list[int] = [size]
        self._used: dict[int, int] = {}

    @property
    def size(self) -> int:
        return self._size

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def used_bytes(self) -> int:
        return self._size - self.free_bytes

    @property
    def free_bytes(self) -> int:
        return sum(self._free_sizes)

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes, default=0)

    def free_blocks(self) -> list[Block]:
        """The free blocks, sorted by offset."""
        return [Block(o, s) for o, s in zip(self._free_offsets, self._free_sizes, strict=True)]

    def used_blocks(self) -> list[Block]:
        """The allocated blocks (sizes rounded to the alignment), sorted by offset."""
        return [Block(o, s) for o, s in sorted(self._used.items())]

    def block_size(self, nbytes: int) -> int:
        """How many bytes a request of ``nbytes`` occupies."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        return align_up(nbytes, self._alignment)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new block of at least ``nbytes``, or None when no free block is large enough."""
        need = self.block_size(nbytes)
        index = self._choose(need)
        if index is None:
            return None
        offset, size = self._free_offsets[index], self._free_sizes[index]
        if size == need:
            del self._free_offsets[index], self._free_sizes[index]
        else:
            self._free_offsets[index] = offset + need
            self._free_sizes[index] = size - need
        self._used[offset] = need
        return offset

    def free(self, offset: int) -> int:
        """Returns the block at ``offset`` to the free list; returns its size."""
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"offset {offset} is not an allocated block")
        index = bisect.bisect_left(self._free_offsets, offset)
        self._free_offsets.insert(index, offset)
        self._free_sizes.insert(index, size)
        self._merge_with_next(index)
        if index > 0:
            self._merge_with_next(index - 1)
        return size

    def fragmentation(self) -> float:
        """``1 - largest free block / total free``: 0 when free space is one block or none."""
        total = self.free_bytes
        return 0.0 if total == 0 else 1.0 - self.largest_free / total

    def _choose(self, need: int) -> int | None:
        fits = (i for i, s in enumerate(self._free_sizes) if s >= need)
        if self._policy is FitPolicy.FIRST:
            return next(fits, None)
        return min(fits, key=lambda i: self._free_sizes[i], default=None)

    def _merge_with_next(self, index: int) -> None:
        if index + 1 >= len(self._free_offsets):
            return
        if self._free_offsets[index] + self._free_sizes[index] == self._free_offsets[index + 1]:
            self._free_sizes[index] += self._free_sizes[index + 1]
            del self._free_offsets[index + 1], self._free_sizes[index + 1]
