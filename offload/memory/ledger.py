"""The pool's ledger: every host byte the runtime holds, by purpose and by NUMA node.

MemAscend shows that pinned pools waste host memory silently (rounding, fragmentation, peaks no one
sees). The ledger makes that visible: bytes mapped, bytes held by leases (rounded to the allocator's
alignment) next to bytes asked for, peaks, and fragmentation. The planner compares a
:class:`PoolStats` snapshot with its plan. The ledger is plain counters; the pool's lock guards it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from offload.utils.sizes import format_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PurposeStats:
    """Leases of one purpose (e.g. "wire", "adam_m")."""

    in_use: int
    """Bytes held now (each lease rounded up to the alignment)."""
    requested: int
    """Bytes asked for by the outstanding leases (in_use minus this is alignment padding)."""
    peak: int
    """Largest in_use seen."""
    leases: int
    """Outstanding leases."""
    total_leases: int
    """Leases ever taken."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStats:
    """Bytes on one NUMA node (None: arenas that are not bound)."""

    reserved: int
    in_use: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """A snapshot of a pool's ledger."""

    name: str
    capacity: int
    """Bytes the pool may map in all."""
    reserved: int
    """Bytes mapped now (sum of arena sizes)."""
    arenas: int
    pinned: bool
    in_use: int
    requested: int
    peak_in_use: int
    leases: int
    total_leases: int
    free: int
    """Bytes mapped and not leased."""
    largest_free: int
    """Largest lease that fits without mapping another arena."""
    by_purpose: dict[str, PurposeStats] = field(default_factory=dict)
    by_node: dict[int | None, NodeStats] = field(default_factory=dict)

    @property
    def fragmentation(self) -> float:
        """``1 - largest free block / total free`` over mapped arenas; 0 when nothing is free."""
        return 0.0 if self.free == 0 else 1.0 - self.largest_free / self.free

    def table(self) -> str:
        """The ledger as a printable table."""
        pin = "pinned" if self.pinned else "not pinned"
        lines = [
            f"pool {self.name!r}: capacity {format_bytes(self.capacity)}, reserved "
            f"{format_bytes(self.reserved)} in {self.arenas} arena(s), {pin}",
            f"in use {format_bytes(self.in_use)} (peak {format_bytes(self.peak_in_use)}) in {self.leases} "
            f"lease(s); free {format_bytes(self.free)}, largest free {format_bytes(self.largest_free)}, "
            f"fragmentation {self.fragmentation:.2f}",
            f"{'purpose':<16}{'in use':>12}{'requested':>12}{'peak':>12}{'leases':>8}{'total':>8}",
        ]
        for purpose, p in sorted(self.by_purpose.items()):
            lines.append(
                f"{purpose:<16}{format_bytes(p.in_use):>12}{format_bytes(p.requested):>12}"
                f"{format_bytes(p.peak):>12}{p.leases:>8}{p.total_leases:>8}"
            )
        lines.append(f"{'numa node':<16}{'reserved':>12}{'in use':>12}")
        for node, n in sorted(self.by_node.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            label = "unbound" if node is None else str(node)
            lines.append(f"{label:<16}{format_bytes(n.reserved):>12}{format_bytes(n.in_use):>12}")
        return "\n".join(lines)


@dataclass(slots=True)
class _Counter:
    in_use: int = 0
    requested: int = 0
    peak: int = 0
    leases: int = 0
    total_leases: int = 0

    def add(self, held: int, requested: int) -> None:
        self.in_use += held
        self.requested += requested
        self.peak = max(self.peak, self.in_use)
        self.leases += 1
        self.total_leases += 1

    def remove(self, held: int, requested: int) -> None:
        self.in_use -= held
        self.requested -= requested
        self.leases -= 1


class Ledger:
    """Counters a pool updates as it maps arenas and hands out leases."""

    def __init__(self, name: str, capacity: int, pinned: bool) -> None:
        self._name = name
        self._capacity = capacity
        self._pinned = pinned
        self._arenas = 0
        self._total = _Counter()
        self._purposes: dict[str, _Counter] = {}
        self._reserved: dict[int | None, int] = {}
        self._node_in_use: dict[int | None, int] = {}

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    def mapped(self, nbytes: int, node: int | None) -> None:
        self._arenas += 1
        self._reserved[node] = self._reserved.get(node, 0) + nbytes

    def unmapped(self, nbytes: int, node: int | None) -> None:
        self._arenas -= 1
        self._reserved[node] -= nbytes

    def leased(self, purpose: str, node: int | None, held: int, requested: int) -> None:
        self._total.add(held, requested)
        self._purposes.setdefault(purpose, _Counter()).add(held, requested)
        self._node_in_use[node] = self._node_in_use.get(node, 0) + held

    def returned(self, purpose: str, node: int | None, held: int, requested: int) -> None:
        self._total.remove(held, requested)
        self._purposes[purpose].remove(held, requested)
        self._node_in_use[node] -= held

    def snapshot(self, free_blocks: Iterable[int]) -> PoolStats:
        """Stats now; ``free_blocks`` are the sizes of every free block of every mapped arena."""
        sizes = list(free_blocks)
        nodes = self._reserved.keys() | self._node_in_use.keys()
        return PoolStats(
            name=self._name,
            capacity=self._capacity,
            reserved=self.reserved,
            arenas=self._arenas,
            pinned=self._pinned,
            in_use=self._total.in_use,
            requested=self._total.requested,
            peak_in_use=self._total.peak,
            leases=self._total.leases,
            total_leases=self._total.total_leases,
            free=sum(sizes),
            largest_free=max(sizes, default=0),
            by_purpose={k: _freeze(c) for k, c in self._purposes.items()},
            by_node={
                n: NodeStats(reserved=self._reserved.get(n, 0), in_use=self._node_in_use.get(n, 0))
                for n in nodes
            },
        )


def _freeze(c: _Counter) -> PurposeStats:
    return PurposeStats(
        in_use=c.in_use, requested=c.requested, peak=c.peak, leases=c.leases, total_leases=c.total_leases
    )
