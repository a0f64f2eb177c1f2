"""CXL memory (CxlMemory) and CxlTier: Adam's m and v of each spilled block on a CXL NUMA node.

CXL memory expanders appear as NUMA nodes with memory and no CPUs (``offload.memory.numa``). The
optimizer only streams through m and v once per step, so they tolerate CXL's extra latency and
lower bandwidth; the buffers the device copies from and to (wire copies, gradients) stay in the
store's pool on local DRAM. Each ``cxl_nodes`` entry gets a ``PinnedPool(numa_node=node,
pin=False)``: the arenas are bound with mbind (MPOL_BIND) before their pages are faulted in, so the
state really lands on that node, and nothing registers them with CUDA (no DMA touches them).
Blocks are striped over the entries by block index (block i on entry ``i % len(cxl_nodes)``), so
everything of one block that lives on CXL (master, m, v, gradient sum) shares a node; an entry
repeated gets that node a larger share.

Every array is a lease with an arena of its own exact page-rounded size (as the store's pool
does), held for the whole run, so acquire and release do no I/O. ``stored_bytes()`` counts the
bytes mapped on the CXL nodes; ``BlockRecord.state_bytes()`` keeps counting only the record's
own (local) memory. The masters (``cxl_master.py``) and gradient sums (``grad_sums.py``) on CXL
use a CxlMemory of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offload.config import ConfigError, Tier
from offload.memory import PinnedPool, numa
from offload.memory.arena import Lease
from offload.store.record import BlockRecord
from offload.store.tiers.base import Held

PAGE = 4096  # arena_bytes of one page: every lease is larger, so it maps an arena of its own


class CxlMemory:
    """Node-bound memory of the ``cxl_nodes`` entries, handed out as fp32 arrays striped by block.
    ``what`` names the user in errors ("optimizer-state", "master", "gradient-sum")."""

    def __init__(self, nodes: Sequence[int], what: str) -> None:
        if not nodes:
            raise ConfigError("cxl_nodes", list(nodes), "placement uses the cxl tier: name a NUMA node")
        found = [_check_node(node, i) for i, node in enumerate(nodes)]
        self.nodes = list(nodes)
        self.what = what
        # Nobody tells the memory how many blocks it will hold, so each pool's capacity is its
        # node's memory: an upper bound, never reached by mapping; what is mapped is exact (one
        # arena per lease).
        self._pools = [
            PinnedPool(n.mem_total, arena_bytes=PAGE, numa_node=n.id, pin=False, name=f"cxl_nodes[{i}]")
            for i, n in enumerate(found)
        ]
        self._leases: list[Lease] = []
        self.closed = False

    def stripe_of(self, index: int) -> int:
        """The ``cxl_nodes`` entry that holds block index's arrays."""
        return index % len(self._pools)

    def array(self, index: int, numel: int, purpose: str) -> Lease:
        """A lease of numel fp32 elements (contents undefined) on block index's node, kept until
        close()."""
        self.check()
        lease = self._pools[self.stripe_of(index)].lease(max(numel, 1) * 4, purpose=purpose)
        self._leases.append(lease)
        return lease

    def stored_bytes(self, tier: Tier | None = None) -> int:
        """Bytes mapped on the CXL nodes (0 when asked for another tier)."""
        if tier not in (None, Tier.CXL):
            return 0
        return sum(pool.stats().reserved for pool in self._pools)

    def check(self) -> None:
        if self.closed:
            raise RuntimeError(f"the cxl {self.what} tier is closed")

    def close(self) -> None:
        """Frees every lease and unmaps the pools; views of them must not be used after."""
        if self.closed:
            return
        self.closed = True
        for lease in self._leases:
            lease.release()
        self._leases.clear()
        for pool in self._pools:
            pool.close()


class CxlTier:
    """See the module docstring. ``nodes``: the ``cxl_nodes`` entries, in stripe order."""

    def __init__(self, nodes: Sequence[int]) -> None:
        self._memory = CxlMemory(nodes, "optimizer-state")
        self.nodes = self._memory.nodes
        self._state: dict[int, tuple[Lease, Lease]] = {}  # block index -> (m, v)

    def stripe_of(self, rec: BlockRecord) -> int:
        """The ``cxl_nodes`` entry that holds rec's state."""
        return self._memory.stripe_of(rec.index)

    def leases(self, rec: BlockRecord) -> tuple[Lease, Lease]:
        """The leases holding rec's m and v (for checking where they are)."""
        return self._state[rec.index]

    def place(self, rec: BlockRecord) -> None:
        m = self._memory.array(rec.index, rec.numel, "adam m")
        v = self._memory.array(rec.index, rec.numel, "adam v")
        m.tensor.zero_()
        v.tensor.zero_()
        self._state[rec.index] = (m, v)
        rec.exp_avg = rec.exp_avg_sq = None

    def prefetch(self, rec: BlockRecord) -> None:
        pass  # always in memory

    def acquire(self, rec: BlockRecord) -> Held:
        self._memory.check()
        entry = self._state.get(rec.index)
        if entry is None:
            raise RuntimeError(f"{rec.name} has no optimizer state on the cxl tier")
        m, v = entry
        return Held(rec.master, m.view(torch.float32, (rec.numel,)), v.view(torch.float32, (rec.numel,)))

    def release(self, rec: BlockRecord) -> None:
        pass  # updated in place: nothing to write back

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Frees every lease and unmaps the pools; views acquire gave must not be used after."""
        self._state.clear()
        self._memory.close()

    def stored_bytes(self, tier: Tier | None = None) -> int:
        return self._memory.stored_bytes(tier)


def _check_node(node: int, i: int) -> numa.NumaNode:
    """The node of cxl_nodes[i], or ConfigError naming the field and why it cannot be bound to."""
    try:
        return numa.check_node(node)
    except ValueError as e:
        raise ConfigError(f"cxl_nodes[{i}]", node, str(e)) from None
