"""Which blocks offload their saved tensors instead of being recomputed (placement.offload_saved).

A choice is a function from block index to bool, asked at each block's forward. "never" is no
function at all (every block recomputes, nothing is set up); "always" and a list are fixed;
"auto" is :class:`MeasuredChoice`: the first step recomputes every block while it times each
block's forward and recompute-plus-backward and counts what the block's graph saves; the next
forward measures the host link, and from then on the blocks that
:func:`offload.plan.recompute.choose` picks are offloaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import psutil
import torch
from torch.autograd.graph import saved_tensors_hooks

from offload.config import ConfigError
from offload.engine.device import Device
from offload.engine.packing import Packing, storage_key
from offload.plan.measure import measure_link
from offload.plan.recompute import BlockCost, Choice, Link, choose

Spec = Literal["never", "auto", "always"] | list[int]


class Traffic:
    """What else crosses the host link per step, besides saved tensors (for the cost model)."""

    def __init__(self, weight_bytes: int, grad_bytes: int) -> None:
        self.weight_bytes = weight_bytes  # uploaded once in forward, once in backward
        self.grad_bytes = grad_bytes  # copied to host in backward
        self.boundary: dict[int, int] = {}  # per block: boundary bytes out in forward, back in backward

    @property
    def boundary_bytes(self) -> int:
        return sum(self.boundary.values())

    def link(self, h2d: float, d2h: float) -> Link:
        return Link(
            h2d,
            d2h,
            h2d_forward=self.weight_bytes,
            h2d_backward=self.weight_bytes + self.boundary_bytes,
            d2h_forward=self.boundary_bytes,
            d2h_backward=self.grad_bytes,
        )


class MeasuredChoice:
    """See the module docstring. ``weights()`` gives the storage keys of every weight buffer
    (never counted as saved: the graph keeps references to them)."""

    def __init__(
        self,
        device: Device,
        blocks: int,
        traffic: Traffic,
        weights: Callable[[], set[int]],
        host_bytes: int | None = None,
    ) -> None:
        self.device = device
        self.blocks = blocks
        self.traffic = traffic
        self.weights = weights
        self.host_bytes = host_bytes  # budgets.host_bytes; None: what the host has free
        self.decision: Choice | None = None
        self._times: dict[tuple[int, str], list[Any]] = {}  # (block, phase) -> [start, end]
        self._saved: dict[int, int] = {}

    def __call__(self, index: int) -> bool:
        if self.decision is None and len(self._saved) == self.blocks:
            self.decision = self._decide()
        return self.decision is not None and self.decision.offload[index]

    @property
    def measuring(self) -> bool:
        return self.decision is None

    @contextlib.contextmanager
    def timed(self, index: int, phase: str) -> Iterator[None]:
        """Times the body on the compute stream (the host clock on the CPU)."""
        if not self.measuring or (index, phase) in self._times:
            yield
            return
        self._times[(index, phase)] = [self._mark()]
        yield
        self._times[(index, phase)].append(self._mark())
        if phase == "backward":  # a frozen block whose backward had nothing to recompute saves nothing
            self._saved.setdefault(index, 0)

    @contextlib.contextmanager
    def counting(self, index: int) -> Iterator[None]:
        """Counts the bytes that offloading would move for what the body's graph saves."""
        if not self.measuring or index in self._saved:
            yield
            return
        keep, seen = self.weights(), {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device == self.device.torch and storage_key(t) not in keep:
                seen[(storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)] = t
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            yield
        self._saved[index] = Packing(list(seen.values())).nbytes

    def add_boundary(self, index: int, nbytes: int) -> None:
        """Boundary-state bytes of one block that go through the host link (host or nvme tier)."""
        if self.measuring:
            self.traffic.boundary[index] = nbytes

    def _mark(self) -> Any:
        if self.device.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.device.compute_stream())
            return ev
        return time.perf_counter()

    def _seconds(self, index: int, phase: str) -> float:
        start, end = self._times[(index, phase)]
        return float(start.elapsed_time(end) / 1e3) if self.device.cuda else float(end - start)

    def _decide(self) -> Choice:
        self.device.synchronize()  # the events of the measured step must have completed
        costs = []
        for i in range(self.blocks):
            fwd = self._seconds(i, "forward")
            costs.append(BlockCost(fwd, max(self._seconds(i, "backward") - fwd, 0.0), self._saved[i]))
        # The saved tensors of every offloaded block are in host memory at once, at the end of
        # forward: keep them within the budget, or within three quarters of what is free now.
        room = int(psutil.virtual_memory().available * 3 // 4)
        limit = room if self.host_bytes is None else min(room, self.host_bytes)
        return choose(costs, self.traffic.link(*measure_link(self.device.torch)), limit)


def make_choice(
    spec: Spec,
    device: Device,
    blocks: int,
    traffic: Traffic,
    weights: Callable[[], set[int]],
    host_bytes: int | None = None,
) -> Callable[[int], bool] | None:
    """The choice of ``placement.offload_saved``; None for "never"."""
    if spec == "never":
        return None
    if spec == "always":
        return lambda index: True
    if spec == "auto":
        return MeasuredChoice(device, blocks, traffic, weights, host_bytes)
    for i, block in enumerate(spec):
        if block >= blocks:
            raise ConfigError(
                f"placement.offload_saved[{i}]", block, f"the model has {blocks} blocks (0 to {blocks - 1})"
            )
    chosen = frozenset(spec)
    return lambda index: index in chosen
