"""Multi-rank training: one rank's view of the torch.distributed process group (ZeRO-3 style).

Under torchrun, each rank owns a contiguous 1/W shard of every streamed block's flat buffers
(fp32 master, Adam m and v, wire copy, gradient). Before a block computes, the ranks all-gather
their wire shards into the device slot; after its backward, they reduce-scatter the block's
gradient so each receives the sum over ranks for its shard, divided by W (the loss is a mean over
the global batch when each rank's loss is the mean over its equal share). Each rank then updates
only its shard. The resident parameters and the blocks kept on the device are replicated: their
gradients are all-reduced and every rank applies the same update.

The transport is torch.distributed (NCCL between GPUs, gloo on CPUs); on a GPU the collectives
are issued from the engine's side streams, so they overlap compute like the copies they extend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from offload.model.layout import ALIGN


def _all_gather(out: torch.Tensor, part: torch.Tensor, async_op: bool) -> Any:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
    return fn(out, part, async_op=async_op)


def _reduce_scatter(out: torch.Tensor, full: torch.Tensor, async_op: bool) -> Any:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, full, async_op=async_op)


@dataclass(frozen=True, slots=True)
class Shard:
    """Elements [lo, hi) of a flat buffer of ``padded`` elements (the layout's, rounded up so
    every rank's shard has the same size); hi may run into the padding."""

    lo: int
    hi: int
    padded: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


class Collective:
    """rank and world size, and the collectives the engine and the checkpoint writer use."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self._side: Any = None

    @classmethod
    def detect(cls) -> Collective | None:
        """The initialised default process group, if it has more than one rank."""
        if not dist.is_available() or not dist.is_initialized():
            return None
        world = dist.get_world_size()
        return cls(dist.get_rank(), world) if world > 1 else None

    @staticmethod
    def local_rank() -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    def shard(self, numel: int) -> Shard:
        """This rank's part of a flat buffer of numel elements: equal shards, ALIGN-rounded so
        each starts on the layout's alignment."""
        size = -(-numel // (self.world * ALIGN)) * ALIGN
        return Shard(self.rank * size, (self.rank + 1) * size, size * self.world)

    def all_gather(self, full: torch.Tensor, part: torch.Tensor) -> Any:
        """full (padded) <- every rank's part, in rank order. Returns the work handle: on a
        GPU, work.wait() orders the caller's current stream after the collective."""
        return _all_gather(full, part, async_op=True)

    def reduce_scatter(self, part: torch.Tensor, full: torch.Tensor) -> Any:
        """part <- the sum over ranks of this rank's shard of full. Returns the work handle."""
        return _reduce_scatter(part, full, async_op=True)

    def all_reduce(self, t: torch.Tensor) -> None:
        """t <- the sum of t over ranks, in place; synchronous (on a GPU: ordered on the
        current stream)."""
        dist.all_reduce(t)

    def gather_full(self, part: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Every rank's shard of a flat buffer (equal parts), put together on the host (a
        collective: every rank calls it in the same order). NCCL needs device tensors, so the
        parts travel there."""
        staged = part.to(device)
        full = torch.empty(part.numel() * self.world, dtype=part.dtype, device=device)
        _all_gather(full, staged, async_op=False)
        return full.cpu()

    # ---- the checkpoint writer's side channel ----------------------------------------------------

    def side(self) -> Any:
        """A gloo group of the same ranks for the checkpoint writer's thread, so its collectives
        never interleave with the training thread's on the default group. Created by the first
        call, which every rank makes at the same point (offload.save is called by all ranks)."""
        if self._side is None:
            self._side = dist.new_group(backend="gloo")
        return self._side

    def gather_to_root(self, part: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets every rank's part (host tensors of one size) end to end; the others None."""
        parts = [torch.empty_like(part) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(part.contiguous(), parts, dst=0, group=self.side())
        return torch.cat(parts) if parts is not None else None

    def agree(self, ok: bool) -> bool:
        """Rank 0's verdict, on every rank."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.broadcast(t, src=0, group=self.side())
        return bool(t.item())

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank is ok."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.side())
        return bool(t.item())
