"""BlockRecord: everything the store keeps for one block (or for the resident parameters)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from offload.model.layout import ALIGN, FlatLayout
from offload.utils.widen import add_widened

if TYPE_CHECKING:
    from offload.store.tiers.grad_sums import GradSumTier


@dataclass(slots=True, eq=False)
class BlockRecord:
    index: int  # block index; -1 for the resident parameters
    name: str
    layout: FlatLayout
    # fp32, flat: the model's weights. A placeholder on the meta device (no memory) when the
    # record's StateTier holds the master (placement.master nvme or cxl): StateTier.acquire gives
    # it then.
    master: torch.Tensor
    # Adam m and v, fp32; None where placement.optimizer_state keeps them off RAM (the optimizer
    # gets them from the runtime's StateTier then).
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    wire: torch.Tensor  # compute dtype, pinned: what is copied to the device (aliases master in fp32)
    # Pinned: where the device's gradients land. Compute dtype, one micro-batch's; float32 with
    # sums_on_device, where it receives the whole sum once a step (Executor.send_sums).
    grad: torch.Tensor
    step: torch.Tensor  # Adam step count (a float tensor, as torch's fused kernel wants)
    grad_acc: torch.Tensor | None = None  # fp32 sum over micro-batches, made when accumulating
    # Where grad_acc is made (placement.gradients cxl, for a spilled block); None: next to grad,
    # in the record's own memory.
    grad_acc_tier: GradSumTier | None = None
    grad_count: int = 0  # backward passes since zero_grad()
    # placement.gradients gpu (a streamed block): micro-batches add into dev_sum, an fp32 sum on
    # the compute device (made by the first backward), and only the sum crosses to host, into
    # grad, when optimizer.step() asks for it. Nothing is folded on the host then.
    sums_on_device: bool = False
    dev_sum: torch.Tensor | None = None
    sum_sent: bool = False  # dev_sum has been copied into grad since its last addition
    folded: bool = False  # grad_acc already holds the last micro-batch too
    # The last micro-batch's gradient being added into grad_acc as it lands, off the training
    # thread (Executor.send_grad, from the second micro-batch on): it reads grad, so it is
    # waited for (settle_fold) before grad is overwritten, read, or the sums start over.
    fold_pending: Future[None] | None = None
    queued: bool = False  # its update for this step was queued during backward
    on_device: bool = False  # all its state lives on the compute device (placement.device_blocks)
    # Layout slots of parameters with requires_grad=False: no gradient, never updated (as torch
    # skips parameters whose .grad is None, weight decay included).
    frozen: frozenset[int] = frozenset()
    # (group, start, end) element ranges the optimizer updates: the layout's group ranges without
    # the frozen slots. Set in __post_init__.
    update_ranges: tuple[tuple[int, int, int], ...] = ()
    version: int = 0  # bumped by every optimizer update
    # Set while no optimizer update of this record is pending; uploads wait on it.
    updated: threading.Event = field(default_factory=threading.Event)
    d2h_done: Any = None  # device event: the last gradient copy to host has landed
    leases: list[Any] = field(default_factory=list)
    # Multi-rank: the [lo, hi) elements of the layout's flat buffer this rank owns; the record's
    # flat tensors (master, m, v, wire, grad) hold just those. None: the whole buffer.
    shard: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.updated.set()
        self.update_ranges = _ranges_without(self.layout, self.frozen, self.shard)

    @property
    def master_on_tier(self) -> bool:
        """The record's StateTier holds its master (``master`` is a meta placeholder)."""
        return self.master.is_meta

    @property
    def numel(self) -> int:
        """Elements of the record's flat tensors (its shard's, when sharded)."""
        return self.layout.numel if self.shard is None else self.shard[1] - self.shard[0]

    def group_ranges(self) -> tuple[tuple[int, int, int], ...]:
        """The layout's (group, start, end) ranges in the record's own element indices."""
        return _clip(self.layout.group_ranges, self.shard)

    def state_bytes(self) -> int:
        """Bytes of state this record holds in memory (on the host, or on the device if on_device);
        state on another tier (m and v, a master, a gradient sum) is counted by the tier
        (``StateTier.stored_bytes``, ``GradSumTier.stored_bytes``)."""
        tensors = [self.master, self.grad]
        tensors += [t for t in (self.exp_avg, self.exp_avg_sq) if t is not None]
        if self.wire.data_ptr() != self.master.data_ptr():
            tensors.append(self.wire)
        if self.grad_acc is not None and self.grad_acc_tier is None:
            tensors.append(self.grad_acc)
        return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)

    def freeze(self, slots: frozenset[int]) -> None:
        """Marks layout slots as frozen (requires_grad=False) and derives the ranges to update."""
        self.frozen = slots
        self.update_ranges = _ranges_without(self.layout, slots, self.shard)

    def zero_grad(self) -> None:
        self.settle_fold()
        self.grad_count = 0
        self.folded = False

    def settle_fold(self) -> bool:
        """Waits for the fold in flight, if any (raises its error); True if there was one: then
        grad_acc holds the last micro-batch too."""
        pending, self.fold_pending = self.fold_pending, None
        if pending is None:
            return False
        pending.result()
        return True

    def fold_previous(self, landed: Callable[[], None]) -> None:
        """Before another micro-batch's gradient overwrites ``grad`` (a streamed block): the
        previous one is in the fp32 sum. Folded as it landed (the fold thread, from the second
        micro-batch on): waited for; else folded now, once ``landed()`` says its copy landed."""
        if self.settle_fold():
            self.folded = False  # after a step() without zero_grad(): sums go on from here
            return
        landed()
        self.fold_grad()

    def fold_grad(self) -> None:
        """Before another micro-batch's gradient overwrites ``grad``: add it into the fp32 sum.

        The caller has made sure the previous device-to-host copy into ``grad`` has landed.
        Additions happen in the same order as autograd's accumulation into ``.grad``, so fp32
        results equal plain PyTorch bit for bit.
        """
        if self.grad_count == 0:
            return
        if self.folded:  # backward after step() without zero_grad(): keep summing onto grad_acc
            self.folded = False
            return
        if self.grad_acc is None:
            self.grad_acc = (
                torch.empty(self.numel, dtype=torch.float32, device=self.grad.device)
                if self.grad_acc_tier is None
                else self.grad_acc_tier.make(self)
            )
        if self.grad_count == 1:
            self.grad_acc.copy_(self.grad)
        else:
            add_widened(self.grad_acc, self.grad)

    def take_grad(self, landed: Callable[[], None] | None = None) -> Callable[[], torch.Tensor] | None:
        """Decides now, for optimizer.step(), which fp32 gradient this record's update will use,
        and returns a function that produces it (run later by the optimizer's worker, after a
        zero_grad() may already have reset the counters). None when there was no backward.
        With sums_on_device the sum's copy into grad is queued already; ``landed()`` waits for it."""
        if self.grad_count == 0:
            return None
        grad = self.grad
        if self.sums_on_device:
            assert landed is not None, "a sum on the device needs its copy to host waited for"

            def sent() -> torch.Tensor:
                landed()
                return grad

            return sent
        if self.grad_count == 1 and not self.folded:
            return lambda: grad if grad.dtype == torch.float32 else grad.float()
        acc = self.grad_acc
        assert acc is not None
        eager = self.fold_pending  # adding the last micro-batch already: waited for, not repeated
        pending = [not self.folded and eager is None]  # the last micro-batch is still to be added, once
        self.folded = True  # a second step() without zero_grad() must not add it twice

        def summed() -> torch.Tensor:
            if eager is not None:
                eager.result()
            if pending[0]:
                add_widened(acc, grad)
                pending[0] = False
            return acc

        return summed


def _ranges_without(
    layout: FlatLayout, frozen: frozenset[int], shard: tuple[int, int] | None = None
) -> tuple[tuple[int, int, int], ...]:
    if not frozen:
        return _clip(layout.group_ranges, shard)
    out: list[tuple[int, int, int]] = []
    ends = [p.offset + -(-p.numel // ALIGN) * ALIGN for p in layout.params]
    for k, p in enumerate(layout.params):
        if k in frozen:
            continue
        if out and out[-1][0] == p.group and out[-1][2] == p.offset:
            out[-1] = (p.group, out[-1][1], ends[k])
        else:
            out.append((p.group, p.offset, ends[k]))
    return _clip(tuple(out), shard)


def _clip(
    ranges: tuple[tuple[int, int, int], ...], shard: tuple[int, int] | None
) -> tuple[tuple[int, int, int], ...]:
    """ranges cut to the shard [lo, hi) and shifted by -lo (empty pieces dropped)."""
    if shard is None:
        return ranges
    lo, hi = shard
    return tuple((g, max(a, lo) - lo, min(b, hi) - lo) for g, a, b in ranges if min(b, hi) > max(a, lo))
