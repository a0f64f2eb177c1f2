"""CxlTier: Adam's m and v of each streamed block in host memory bound to a CXL NUMA node.

CXL memory expanders appear as NUMA nodes with memory and no CPUs (``offload.memory.numa``). The
optimizer only streams through m and v once per step, so they tolerate CXL's extra latency and
lower bandwidth; the buffers the device copies from and to (wire copies, gradients) stay in the
store's pool on local DRAM. Each ``cxl_nodes`` entry gets a ``PinnedPool(numa_node=node,
pin=False)``: the arenas are bound with mbind (MPOL_BIND) before their pages are faulted in, so the
state really lands on that node, and nothing registers them with CUDA (no DMA touches them).
Blocks are striped round-robin over the entries, block by block; an entry repeated gets that
node a larger share.

m and v live permanently in their leases (one each, in an arena of its own exact page-rounded
size, as the store's pool does), so acquire and release do no I/O. ``stored_bytes()`` counts the
bytes mapped on the CXL nodes; ``BlockRecord.state_bytes()`` keeps counting only the record's
own (local) memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offload.config import ConfigError
from offload.memory import PinnedPool, numa
from offload.memory.arena import Lease
from offload.store.record import BlockRecord
from offload.store.tiers.base import Held

PAGE = 4096  # arena_bytes of one page: every lease is larger, so it maps an arena of its own


class CxlTier:
    """See the module docstring. ``nodes``: the ``cxl_nodes`` entries, in stripe order."""

    def __init__(self, nodes: Sequence[int]) -> None:
        if not nodes:
            raise ConfigError("cxl_nodes", list(nodes), "placement uses the cxl tier: name a NUMA node")
        found = [_check_node(node, i) for i, node in enumerate(nodes)]
        self.nodes = list(nodes)
        # The tier is not told how many blocks it will hold, so each pool's capacity is its node's
        # memory: an upper bound, never reached by mapping; what is mapped is exact (one arena per
        # lease).
        self._pools = [
            PinnedPool(n.mem_total, arena_bytes=PAGE, numa_node=n.id, pin=False, name=f"cxl_nodes[{i}]")
            for i, n in enumerate(found)
        ]
        self._state: dict[int, tuple[int, Lease, Lease]] = {}  # block index -> (stripe, m, v)
        self._closed = False

    def stripe_of(self, rec: BlockRecord) -> int:
        """The ``cxl_nodes`` entry that holds rec's state."""
        return self._state[rec.index][0]

    def leases(self, rec: BlockRecord) -> tuple[Lease, Lease]:
        """The leases holding rec's m and v (for checking where they are)."""
        _, m, v = self._state[rec.index]
        return m, v

    def place(self, rec: BlockRecord) -> None:
        self._check()
        stripe = len(self._state) % len(self._pools)
        pool = self._pools[stripe]
        nbytes = max(rec.numel, 1) * 4
        m = pool.lease(nbytes, purpose="adam m")
        try:
            v = pool.lease(nbytes, purpose="adam v")
        except BaseException:
            m.release()
            raise
        m.tensor.zero_()
        v.tensor.zero_()
        self._state[rec.index] = (stripe, m, v)
        rec.exp_avg = rec.exp_avg_sq = None

    def prefetch(self, rec: BlockRecord) -> None:
        pass  # always in memory

    def acquire(self, rec: BlockRecord) -> Held:
        self._check()
        entry = self._state.get(rec.index)
        if entry is None:
            raise RuntimeError(f"{rec.name} has no optimizer state on the cxl tier")
        _, m, v = entry
        return Held(rec.master, m.view(torch.float32, (rec.numel,)), v.view(torch.float32, (rec.numel,)))

    def release(self, rec: BlockRecord) -> None:
        pass  # updated in place: nothing to write back

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Frees every lease and unmaps the pools; views acquire gave must not be used after."""
        if self._closed:
            return
        self._closed = True
        for _, m, v in self._state.values():
            m.release()
            v.release()
        self._state.clear()
        for pool in self._pools:
            pool.close()

    def stored_bytes(self) -> int:
        return sum(pool.stats().reserved for pool in self._pools)

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("the cxl optimizer-state tier is closed")


def _check_node(node: int, i: int) -> numa.NumaNode:
    """The node of cxl_nodes[i], or ConfigError naming the field and why it cannot be bound to."""
    try:
        return numa.check_node(node)
    except ValueError as e:
        raise ConfigError(f"cxl_nodes[{i}]", node, str(e)) from None
