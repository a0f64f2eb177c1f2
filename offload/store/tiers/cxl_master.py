"""CxlMasterTier: the spilled blocks' fp32 masters on CXL memory, their m and v on another tier.

``placement.master: cxl``. The optimizer reads and writes a block's master once per update, and
nothing else touches it: the device reads the compute-dtype wire copy, which stays in the store's
pinned pool on local DRAM (the CXL study's rule: streaming-only state to CXL, DMA-hot buffers
local). So the master is streaming-only state, like m and v, as long as it is not itself the wire
copy: in float32 it is, and the config refuses master cxl there.

The tier wraps the one that holds the block's m and v (``HostTier``: the record's tensors;
``CxlTier``; ``NvmeTier``: files) and swaps the master in what it acquires, so callers still get
one ``Held(master, m, v)`` per block and never ask where each array is. As with the nvme master,
the record keeps a placeholder on the meta device (``rec.master_on_tier``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offload.config import Tier
from offload.memory.arena import Lease
from offload.store.record import BlockRecord
from offload.store.tiers.base import Held, StateTier
from offload.store.tiers.cxl import CxlMemory


class CxlMasterTier:
    """Masters in leases bound to the ``cxl_nodes`` (striped by block index, as CxlTier's m and
    v are, so a block's master and m, v share a node); m and v on ``state``."""

    def __init__(self, nodes: Sequence[int], state: StateTier) -> None:
        self._memory = CxlMemory(nodes, "master")
        self.state = state
        self._masters: dict[int, Lease] = {}  # block index -> its master

    def lease(self, rec: BlockRecord) -> Lease:
        """The lease holding rec's master (for checking where it is)."""
        return self._masters[rec.index]

    def place(self, rec: BlockRecord) -> None:
        self.state.place(rec)  # first: HostTier allocates m and v next to the record's master
        lease = self._memory.array(rec.index, rec.numel, "master")
        lease.view(torch.float32, (rec.numel,)).copy_(rec.master)
        self._masters[rec.index] = lease
        rec.master = torch.empty(rec.numel, dtype=torch.float32, device="meta")  # no memory

    def prefetch(self, rec: BlockRecord) -> None:
        self.state.prefetch(rec)

    def acquire(self, rec: BlockRecord) -> Held:
        self._memory.check()
        lease = self._masters.get(rec.index)
        if lease is None:
            raise RuntimeError(f"{rec.name} has no master on the cxl tier")
        held = self.state.acquire(rec)
        return held._replace(master=lease.view(torch.float32, (rec.numel,)))

    def release(self, rec: BlockRecord) -> None:
        self.state.release(rec)

    def flush(self) -> None:
        self.state.flush()

    def close(self) -> None:
        """Closes the m and v tier, then frees the masters; views acquire gave must not be used after."""
        self.state.close()
        self._masters.clear()
        self._memory.close()

    def stored_bytes(self, tier: Tier | None = None) -> int:
        return self._memory.stored_bytes(tier) + self.state.stored_bytes(tier)
