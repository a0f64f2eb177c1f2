"""Where a block's fp32 gradient sum lives (``placement.gradients``): GradSumTier and CxlGradSums.

Gradients come off the device into the record's pinned ``grad`` buffer in the compute dtype: a
DMA target, so it stays in the store's pool on local DRAM whatever the placement. What can move is
the fp32 sum over micro-batches (``BlockRecord.grad_acc``), made on the first accumulation: 4
bytes a parameter, 52 GB for a 13B model. It is written once per micro-batch (``fold_grad``, on
the training thread, from the landed gradient) and read once by the update: streaming-only state,
which the CXL study puts on CXL.

A record whose ``grad_acc_tier`` is None makes its sum next to its gradient (host RAM, or the
device for a device block); the runtime sets a tier on the spilled blocks' records when
``placement.gradients`` is cxl. A sum on NVMe is refused by the config: it would be read and
written back once per micro-batch, on backward's critical path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from offload.config import Tier
from offload.memory.arena import Lease
from offload.store.record import BlockRecord
from offload.store.tiers.cxl import CxlMemory


class GradSumTier(Protocol):
    def make(self, rec: BlockRecord) -> torch.Tensor:
        """A flat fp32 buffer of rec.numel elements for rec's gradient sum (contents undefined:
        the first fold copies into it). Called once per record, on its first accumulation."""
        ...

    def stored_bytes(self, tier: Tier | None = None) -> int:
        """Bytes of gradient sums this tier keeps outside the records (on tier; None: on any)."""
        ...

    def close(self) -> None:
        """Frees the sums; the records it made them for drop theirs (a later fold raises)."""


class CxlGradSums:
    """Gradient sums in leases bound to the ``cxl_nodes``, on the node of the block's other CXL
    state (striped by block index)."""

    def __init__(self, nodes: Sequence[int]) -> None:
        self._memory = CxlMemory(nodes, "gradient-sum")
        self._made: dict[int, tuple[BlockRecord, Lease]] = {}  # block index -> (record, its sum)

    def make(self, rec: BlockRecord) -> torch.Tensor:
        lease = self._memory.array(rec.index, rec.numel, "gradient sum")
        self._made[rec.index] = (rec, lease)
        return lease.view(torch.float32, (rec.numel,))

    def lease(self, rec: BlockRecord) -> Lease:
        """The lease holding rec's sum (for checking where it is)."""
        return self._made[rec.index][1]

    def stored_bytes(self, tier: Tier | None = None) -> int:
        return self._memory.stored_bytes(tier)

    def close(self) -> None:
        for rec, _ in self._made.values():
            rec.grad_acc = None  # its memory is unmapped next
        self._made.clear()
        self._memory.close()
