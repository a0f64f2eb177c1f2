"""StateTier: where a record's Adam state (m and v, fp32) lives, and HostTier, the tier in RAM.

The optimizer asks a tier for a record's state around each update: ``prefetch(rec)`` may start
bringing it in early, ``acquire(rec)`` returns it (waiting if it is still on its way),
``release(rec)`` says the update is done with it (a tier off RAM starts writing it back).
``flush()`` waits for every write-back, ``close()`` frees what the tier holds.

The state is always m and v; a tier may hold the fp32 master too (NvmeTier with
``placement.master: nvme``, CxlMasterTier with ``placement.master: cxl``, which wraps the tier
of m and v). The record's ``master`` is then a placeholder on the meta device,
and ``acquire`` is the only way to the values: :class:`Held` carries all three either way, so a
caller never asks where the master is.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from offload.config import Tier
from offload.store.record import BlockRecord


class Held(NamedTuple):
    """A record's state while acquired: flat fp32 tensors, updated in place."""

    master: torch.Tensor
    """The record's own ``master``, or the tier's copy when the tier holds it."""
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class StateTier(Protocol):
    def place(self, rec: BlockRecord) -> None:
        """Makes room for rec's m and v, zero-filled (at wrap time); a tier that holds masters
        takes rec's master too, and leaves a meta placeholder in the record."""

    def prefetch(self, rec: BlockRecord) -> None:
        """Starts bringing rec's state in, to be acquired soon; returns without waiting."""

    def acquire(self, rec: BlockRecord) -> Held:
        """rec's master, exp_avg and exp_avg_sq, flat fp32, ready to be updated in place."""
        ...

    def release(self, rec: BlockRecord) -> None:
        """The update of rec is done with the tensors acquire gave."""

    def flush(self) -> None:
        """Waits until every released state is stored; raises a failed write's error."""

    def close(self) -> None:
        """Frees the tier's memory and files; the tier is unusable afterwards."""

    def stored_bytes(self, tier: Tier | None = None) -> int:
        """Bytes of state this tier keeps outside the records (files on disk, memory mapped on
        CXL nodes), on tier (None: on every tier; a tier may keep masters on one and m, v on
        another); ``BlockRecord.state_bytes`` counts the records' own memory."""
        ...


class HostTier:
    """Today's placement: m and v are tensors the record holds (host RAM, or device memory for a
    record kept on the device), so acquiring them is free and there is nothing to write back."""

    def place(self, rec: BlockRecord) -> None:
        rec.exp_avg = torch.zeros(rec.numel, dtype=torch.float32, device=rec.master.device)
        rec.exp_avg_sq = torch.zeros(rec.numel, dtype=torch.float32, device=rec.master.device)

    def prefetch(self, rec: BlockRecord) -> None:
        pass

    def acquire(self, rec: BlockRecord) -> Held:
        if rec.exp_avg is None or rec.exp_avg_sq is None:
            raise RuntimeError(f"{rec.name} has no optimizer state in memory: it was placed on another tier")
        return Held(rec.master, rec.exp_avg, rec.exp_avg_sq)

    def release(self, rec: BlockRecord) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stored_bytes(self, tier: Tier | None = None) -> int:
        return 0
