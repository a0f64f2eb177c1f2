"""The pinned-buffer pool: a few large host arenas carved into leases.

Arenas are mapped lazily, ``arena_bytes`` at a time, up to ``capacity``; each is registered with CUDA
once at its exact size (when pinning) and with any attached I/O engine. A lease is 4096-byte aligned
(``ALIGNMENT``: O_DIRECT needs it) and goes back to its arena's free list when released. One lock
guards the allocators and the ledger, so leases may be taken and returned from several threads.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from offload.memory import cuda, numa
from offload.memory.allocator import FreeListAllocator, align_up
from offload.memory.arena import HostArena, Lease, LeaseError, page_size
from offload.memory.ledger import Ledger, PoolStats
from offload.utils.sizes import format_bytes, parse_bytes

if TYPE_CHECKING:
    from types import TracebackType

POISON = 0xA5
"""Byte written over released leases when the pool poisons, so stale views read as garbage."""
DEFAULT_ARENA_BYTES = 1 << 30


class PoolExhausted(MemoryError):
    """A lease does not fit in the mapped arenas and the capacity left cannot map one that fits."""


class IOEngine(Protocol):
    """What :meth:`PinnedPool.attach_io` needs from an I/O engine (registered buffers)."""

    def register(self, ptr: int, nbytes: int) -> object: ...

    def unregister(self, ptr: int) -> object: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """Settings of a :class:`PinnedPool` (byte counts already parsed)."""

    capacity: int
    """Bytes the pool may map in all."""
    arena_bytes: int | None = None
    """Bytes mapped at a time; default min(capacity, 1 GiB). Larger leases get an arena of their own."""
    numa_node: int | None = None
    """NUMA node every arena is bound to (mbind); None leaves placement to the kernel."""
    pin: cuda.PinMode = "auto"
    """Register arenas with CUDA: "auto" when CUDA is available, True requires it, False never."""
    hugepages: bool = True
    """Ask for transparent huge pages (madvise); the kernel may decline."""
    poison: bool = False
    """Fill released leases with 0xA5 so that stale views show up in tests."""
    name: str = "host"
    """Name shown in the ledger and in errors."""

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or self.capacity < page_size():
            raise ValueError(f"capacity must be at least one page ({page_size()} bytes), got {self.capacity}")
        if self.arena_bytes is not None and not 0 < self.arena_bytes <= self.capacity:
            raise ValueError(f"arena_bytes must be in (0, capacity={self.capacity}], got {self.arena_bytes}")
        if self.numa_node is not None and self.numa_node < 0:
            raise ValueError(f"numa_node must be a node id >= 0 or None, got {self.numa_node}")
        if self.pin not in (True, False, "auto"):
            raise ValueError(f"pin must be True, False or 'auto', got {self.pin!r}")

    @property
    def arena_unit(self) -> int:
        """Size of a regular arena: arena_bytes rounded up to pages, and never above capacity."""
        unit = min(self.capacity, DEFAULT_ARENA_BYTES) if self.arena_bytes is None else self.arena_bytes
        return min(align_up(unit, page_size()), _page_floor(self.capacity))


@dataclass(slots=True)
class _Slot:
    arena: HostArena
    allocator: FreeListAllocator
    dedicated: bool
    """Mapped for one lease larger than arena_bytes; small leases use it only as a last resort."""


class PinnedPool:
    """Page-aligned host arenas, pinned with CUDA when asked, handed out as :class:`Lease` objects."""

    def __init__(
        self,
        capacity: int | str,
        arena_bytes: int | str | None = None,
        numa_node: int | None = None,
        pin: cuda.PinMode = "auto",
        hugepages: bool = True,
        poison: bool = False,
        name: str = "host",
    ) -> None:
        arena = None if arena_bytes is None else _parse_size(arena_bytes, "arena_bytes")
        config = PoolConfig(
            capacity=_parse_size(capacity, "capacity"),
            arena_bytes=arena,
            numa_node=numa_node,
            pin=pin,
            hugepages=hugepages,
            poison=poison,
            name=name,
        )
        if numa_node is not None:
            numa.check_node(numa_node)
        self.config = config
        self._pinned = cuda.resolve_pin(pin)
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._outstanding: dict[int, Lease] = {}
        self._engines: list[IOEngine] = []
        self._ledger = Ledger(name, config.capacity, self._pinned)
        self._closed = False
        self.mapping_s = {"map": 0.0, "pin": 0.0, "io": 0.0}
        """Seconds spent making arenas so far: mapping them (every page touched), pinning them
        with CUDA, registering them with the I/O engines."""

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def closed(self) -> bool:
        return self._closed

    def lease(self, nbytes: int, *, purpose: str = "unspecified") -> Lease:
        """``nbytes`` of arena memory, 4096-byte aligned; raises PoolExhausted when it cannot fit."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        with self._lock:
            if self._closed:
                raise LeaseError(f"pool {self.config.name!r} is closed")
            placed = self._place(nbytes)
            if placed is None:
                raise PoolExhausted(self._exhausted_message(nbytes, purpose))
            slot, offset = placed
            lease = Lease(self._release, slot.arena, offset, nbytes, purpose)
            self._outstanding[id(lease)] = lease
            self._ledger.leased(purpose, slot.arena.node, align_up(nbytes), nbytes)
            return lease

    def stats(self) -> PoolStats:
        """A snapshot of the ledger."""
        with self._lock:
            sizes = [b.size for s in self._slots for b in s.allocator.free_blocks()]
            return self._ledger.snapshot(sizes)

    def report(self) -> str:
        """The ledger as a printable table."""
        return self.stats().table()

    def attach_io(self, engine: IOEngine) -> None:
        """Registers every arena, now and future, with ``engine``; unregisters them at close.

        Arenas mapped while an engine is attached use base pages, not transparent huge pages:
        registering huge pages with an io_uring ring was slow on the H100 host (kernel 6.18),
        4.2 s for 4 GiB with 8 GiB registered before and little free memory, 27 s for 5.3 GiB of
        staging leases in a 128K-token run, where base pages took 0.1-0.3 s
        (``scripts/probe_pinning.py``; the kernel checks each huge page against the pages already
        registered, and pins for the long term). These arenas are DMA buffers, for the disk and
        device copies, which ran as fast from base pages."""
        with self._lock:
            if self._closed:
                raise LeaseError(f"pool {self.config.name!r} is closed")
            _register_all(engine, [s.arena for s in self._slots])
            self._engines.append(engine)

    def detach_io(self, engine: IOEngine) -> None:
        """Unregisters every arena from ``engine`` (call it before the engine shuts down)."""
        with self._lock:
            if engine not in self._engines:
                raise ValueError(f"{engine!r} is not attached to pool {self.config.name!r}")
            self._engines.remove(engine)
            for slot in self._slots:
                engine.unregister(slot.arena.ptr)

    def close(self, force: bool = False) -> None:
        """Unregisters and unmaps every arena. Outstanding leases raise LeaseError unless ``force``."""
        with self._lock:
            if self._closed:
                return
            if self._outstanding and not force:
                names = ", ".join(repr(lease) for lease in list(self._outstanding.values())[:8])
                raise LeaseError(
                    f"pool {self.config.name!r} closed with {len(self._outstanding)} lease(s) outstanding: "
                    f"{names}; release them first or close(force=True)"
                )
            for lease in self._outstanding.values():
                lease._end("revoked")
                self._ledger.returned(lease.purpose, lease.node, align_up(lease.nbytes), lease.nbytes)
            self._outstanding.clear()
            self._closed = True
            errors = [e for slot in self._slots for e in self._unmap(slot)]
            self._slots.clear()
        if errors:
            raise RuntimeError(
                f"closing pool {self.config.name!r}: {len(errors)} error(s): {errors}"
            ) from errors[0]

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # While an exception unwinds, leases are routinely still out; report the real error, not them.
        self.close(force=exc_type is not None)

    def __repr__(self) -> str:
        s = self.stats()
        return f"PinnedPool({s.name!r}, in use {format_bytes(s.in_use)} of {format_bytes(s.reserved)} mapped)"

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if self._outstanding.pop(id(lease), None) is None:
                raise LeaseError(
                    f"{lease!r} cannot be released: it was released already, or its pool force-closed"
                )
            if self.config.poison:
                # Under the lock: the block is not free yet, so no other lease can be writing it.
                ctypes.memset(lease.arena.ptr + lease.offset, POISON, align_up(lease.nbytes))
            slot = next(s for s in self._slots if s.arena is lease.arena)
            slot.allocator.free(lease.offset)
            lease._end("released")
            self._ledger.returned(lease.purpose, lease.node, align_up(lease.nbytes), lease.nbytes)

    def _place(self, nbytes: int) -> tuple[_Slot, int] | None:
        big = align_up(nbytes) > self.config.arena_unit
        regular = [s for s in self._slots if not s.dedicated]
        oversized = [s for s in self._slots if s.dedicated]
        first, last = (oversized, []) if big else (regular, oversized)
        return _fit(first, nbytes) or self._map_for(nbytes, big) or _fit(last, nbytes)

    def _map_for(self, nbytes: int, big: bool) -> tuple[_Slot, int] | None:
        room = _page_floor(self.config.capacity - self._ledger.reserved)
        held = align_up(nbytes, page_size())
        size = held if big else min(self.config.arena_unit, room)
        if size < held or size > room:
            return None
        # Under the pool lock: mapping is rare, and two threads short of space must not both map.
        huge = self.config.hugepages and not self._engines  # see attach_io
        arena = HostArena(size, node=self.config.numa_node, hugepages=huge, pin=self._pinned)
        start = time.perf_counter()
        try:
            for engine in self._engines:
                _register_all(engine, [arena])
        except BaseException:
            arena.close()
            raise
        self.mapping_s["map"] += arena.map_s
        self.mapping_s["pin"] += arena.pin_s
        self.mapping_s["io"] += time.perf_counter() - start
        slot = _Slot(arena, FreeListAllocator(arena.size), dedicated=big)
        self._slots.append(slot)
        self._ledger.mapped(arena.size, arena.node)
        return _fit([slot], nbytes)

    def _unmap(self, slot: _Slot) -> list[Exception]:
        errors: list[Exception] = []
        for engine in self._engines:
            try:
                engine.unregister(slot.arena.ptr)
            except Exception as e:
                errors.append(e)
        try:
            slot.arena.close()
        except Exception as e:
            errors.append(e)
        self._ledger.unmapped(slot.arena.size, slot.arena.node)
        return errors

    def _exhausted_message(self, nbytes: int, purpose: str) -> str:
        sizes = [b.size for s in self._slots for b in s.allocator.free_blocks()]
        return (
            f"pool {self.config.name!r} cannot lease {format_bytes(nbytes)} ({nbytes} bytes) for {purpose!r}: "
            f"no mapped arena has a free block that large and the capacity left cannot map one\n"
            + self._ledger.snapshot(sizes).table()
        )


def _fit(slots: list[_Slot], nbytes: int) -> tuple[_Slot, int] | None:
    for slot in slots:
        offset = slot.allocator.allocate(nbytes)
        if offset is not None:
            return slot, offset
    return None


def _register_all(engine: IOEngine, arenas: list[HostArena]) -> None:
    """Registers each arena with ``engine``; on a failure, undoes the ones done and re-raises."""
    done: list[HostArena] = []
    try:
        for arena in arenas:
            engine.register(arena.ptr, arena.size)
            done.append(arena)
    except BaseException:
        for arena in done:
            engine.unregister(arena.ptr)
        raise


def _page_floor(nbytes: int) -> int:
    return nbytes // page_size() * page_size()


def _parse_size(value: int | str, field: str) -> int:
    """parse_bytes, with the setting's name in the error."""
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
