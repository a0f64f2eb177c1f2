"""What each block keeps for its backward instead of being recomputed (placement.offload_saved).

A choice is a function from block index to :class:`~offload.plan.recompute.Keep`, asked at each
block's forward. "never" is no function at all (every block recomputes, nothing is set up);
"always" (every graph in host memory), a list (those blocks' graphs in host memory) and a
mapping ``{kind: [blocks]}`` are fixed; "auto" is :class:`MeasuredChoice`. Its first two passes
(forward and backward; steps, without gradient accumulation) recompute every block; the second
is measured (the first pays for warm-up: kernel selection, allocator growth, lazy
initialisation, which would pass for compute) for what the cost model needs:

- each block's forward and recompute-plus-backward compute, timed from the moment its weights
  are in place (the executor's timer: CUDA events on the compute stream, the host clock on the
  CPU), so a wait for the weight stream does not pass for compute;
- the bytes its graph saves (a pack hook that moves nothing, in the recompute), and the time
  and bytes of its attention calls (engine/attention.py's Probe, in the forward);
- the GPU time between the last block's forward and its backward (the head and the loss);
- the CPU optimizer's busy time over the pass's wall time (the updater's clock);
- the step's peak device memory (what the caching allocator reserved), which with what lies
  outside the allocator and a margin of 8% of the device (at least 2 GiB) leaves the room kept
  tensors may take (:func:`device_room`);
- the pass's wall time, from its first block's forward to the next pass's: what the model does
  not explain of it is added to every estimate (offload.plan.recompute.calibrated);
- with the boundary states on nvme, the seconds the disk was busy writing them in forward and
  reading them back in backward (the store's DiskClock): the least each phase can take.

At the next forward it measures the host link (each way, and both ways at once) and
:func:`offload.plan.recompute.choose` decides; ``decision.describe()`` says what and why.

A choice that keeps something is then measured as the recompute was: after one pass with it
(the first pays for the kept tensors' first allocations), the next pass's wall time becomes the
decision's ``measured_step_s``. Where it is no faster than the measured recompute pass, auto
goes back to recomputing every block and the decision says why (``reverted``): a model that
misjudged the machine costs one pass, not the run. Where the choice also grew the NVMe staging
leases (offload.plan.recompute.choose_staged), the pass it was made from ran with fewer, so one
more pass recomputes every block with the new leases first, and that pass is the one compared
(the decision's ``recompute_measured_s``): the gain measured is the keeps', not the leases'.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import psutil
import torch
from torch.autograd.graph import saved_tensors_hooks

from offload.config import BudgetsConfig, ConfigError
from offload.engine.attention import Probe
from offload.engine.device import Device
from offload.engine.packing import Packing, storage_key
from offload.plan.measure import measure_duplex, measure_link
from offload.plan.recompute import (
    BlockCost,
    Bounds,
    Choice,
    Keep,
    Link,
    Staging,
    choose,
    choose_staged,
    keep_margin,
)

if TYPE_CHECKING:
    from offload.engine.activations_nvme import DiskClock, DiskTime, NvmeStore

Spec = Literal["never", "auto", "always"] | list[int] | dict[str, list[int]]
Chooser = Callable[[int], Keep]

_FORWARD, _BACKWARD = "forward", "recompute+backward"  # the executor's compute spans
WARMUP_PASSES = 1
"""Passes (forward and backward) auto runs before the one it measures."""
KEPT_WARMUP_PASSES = 1
"""Passes with a choice that keeps something before the one measured against the recompute."""
HOST_MARGIN_BYTES = 4 << 30
"""Host memory auto leaves free when it keeps tensors there: the rest of the process grows
(allocator caches, I/O buffers), and pinned memory cannot be swapped out."""


class Traffic:
    """What else crosses the host link per step, besides kept tensors (for the cost model), and
    the clock of the disk the boundary states go to (nvme; None: another tier)."""

    def __init__(self, weight_bytes: int, grad_bytes: int, staging: NvmeStore | None = None) -> None:
        self.weight_bytes = weight_bytes  # uploaded once in forward, once in backward
        self.grad_bytes = grad_bytes  # copied to host in backward
        self.boundary: dict[int, int] = {}  # per block: boundary bytes out in forward, back in backward
        self.staging = staging  # the NVMe store, whose staging leases the choice may grow

    @property
    def disk(self) -> DiskClock | None:
        """The clock of the disk the boundary states go to (nvme; None: another tier)."""
        return None if self.staging is None else self.staging.clock

    @property
    def boundary_bytes(self) -> int:
        return sum(self.boundary.values())

    def link(self, h2d: float, d2h: float, duplex: float | None = None) -> Link:
        return Link(
            h2d,
            d2h,
            h2d_forward=self.weight_bytes,
            h2d_backward=self.weight_bytes + self.boundary_bytes,
            d2h_forward=self.boundary_bytes,
            d2h_backward=self.grad_bytes,
            duplex_bytes_s=duplex,
        )


class MeasuredChoice:
    """See the module docstring. ``weights()`` gives the storage keys of every weight buffer
    (never counted as saved: the graph keeps references to them); ``optimizer_busy()`` the
    optimizer worker's busy seconds so far (None:
    the CPU bound is not counted)."""

    def __init__(
        self,
        device: Device,
        blocks: int,
        traffic: Traffic,
        weights: Callable[[], set[int]],
        budgets: BudgetsConfig | None = None,
        optimizer_busy: Callable[[], float] | None = None,
        device_need: int = 0,
    ) -> None:
        self.device = device
        self.device_need = device_need  # the plan's gpu bytes besides the kept tensors (CPU room)
        self.blocks = blocks
        self.traffic = traffic
        self.weights = weights
        self.budgets = budgets or BudgetsConfig()
        self.optimizer_busy = optimizer_busy
        self.decision: Choice | None = None
        self._times: dict[tuple[int, str], list[Any]] = {}  # (block, phase) -> [start, end]
        self._saved: dict[int, int] = {}
        self._attention: dict[int, Probe] = {}
        self._busy_start: float | None = None
        self._passes = 0  # backward passes finished so far
        self._pass_start: float | None = None  # host clock at the timed pass's first forward
        # (the measured recompute pass, then the pass that checks the choice)
        self.disk: tuple[DiskTime, DiskTime] | None = None
        """The disk's (written, read) over the measured pass (boundary states on nvme)."""
        self._recompute_s = 0.0  # the measured recompute pass's wall time
        self._decided = 0  # passes finished when the choice was made
        self._baseline: float | None = None  # host clock at the start of the pass recomputing
        # with the leases the choice grew (None: no such pass running)
        self.decide_s: dict[str, float] = {}
        """Seconds the decision took, by part: the device's sync, the costs and room, the link's
        measurement, the choice, and mapping the staging leases it grew."""

    def __call__(self, index: int) -> Keep:
        if index == 0 and self.decision is None:
            now = time.perf_counter()
            if len(self._saved) == self.blocks:
                # The measured pass began at its block 0's forward and ends now, at the next
                # one's: the optimizer step and the loss's sync in between.
                assert self._pass_start is not None
                if self.traffic.disk is not None:
                    self.disk = self.traffic.disk.stop()
                self._recompute_s, self._decided = now - self._pass_start, self._passes
                self._pass_start = None
                self.decision = self._decide(self._recompute_s)
                if self.decision.staging and self.decision.blocks:
                    # This pass recomputes with the new leases (mapped by now), timed from here:
                    # not the decision's own work.
                    self._baseline = time.perf_counter()
                else:
                    self.decision = replace(self.decision, recompute_measured_s=self._recompute_s)
            elif self._passes == WARMUP_PASSES and self._pass_start is None:
                self._pass_start = now
                self._busy_start = None if self.optimizer_busy is None else self.optimizer_busy()
                if self.traffic.disk is not None:
                    self.traffic.disk.start()
        elif index == 0 and self._baseline is not None:
            assert self.decision is not None
            now = time.perf_counter()
            self._recompute_s, self._decided = now - self._baseline, self._passes
            self._baseline = None
            self.decision = replace(self.decision, recompute_measured_s=self._recompute_s)
        elif index == 0 and self.verifying:
            self._verify(time.perf_counter())
        if self.decision is None or self._baseline is not None:
            return Keep.RECOMPUTE
        return self.decision.keep[index]

    @property
    def verifying(self) -> bool:
        """A choice that keeps something is made and its step not measured yet."""
        d = self.decision
        return d is not None and bool(d.blocks) and d.measured_step_s is None and self._baseline is None

    def _verify(self, now: float) -> None:
        """At block 0's forward: times the pass after KEPT_WARMUP_PASSES with the choice, and
        goes back to recomputing if it was no faster than the measured recompute pass."""
        assert self.decision is not None
        ran = self._passes - self._decided
        if ran == KEPT_WARMUP_PASSES and self._pass_start is None:
            self._pass_start = now
        elif ran > KEPT_WARMUP_PASSES and self._pass_start is not None:
            kept = now - self._pass_start
            d = replace(self.decision, measured_step_s=kept)
            if kept >= self._recompute_s:
                reverted = (
                    f"the choice ({self.decision.describe()}) measured {kept:.3f} s a pass against "
                    f"{self._recompute_s:.3f} s recomputing"
                )
                d = replace(d, keep=(Keep.RECOMPUTE,) * self.blocks, reverted=reverted)
            self.decision = d

    @property
    def measuring(self) -> bool:
        """No decision yet (every block recomputes)."""
        return self.decision is None

    @property
    def recording(self) -> bool:
        """The pass running now is the measured one."""
        return self.decision is None and self._passes >= WARMUP_PASSES

    @contextlib.contextmanager
    def timer(self, phase: str, index: int) -> Iterator[None]:
        """The executor's timer: times block index's compute in phase, once, while measuring."""
        if not self.recording or (index, phase) in self._times:
            yield
            return
        self._times[(index, phase)] = [self._mark()]
        yield
        self._times[(index, phase)].append(self._mark())

    @contextlib.contextmanager
    def probing(self, index: int) -> Iterator[None]:
        """Times and counts block index's attention calls in its forward, once."""
        if not self.recording or index in self._attention:
            yield
            return
        probe = Probe(self.device.cuda)
        with probe:
            yield
        self._attention[index] = probe

    def done(self, index: int) -> None:
        """Block index's backward has run (a frozen block whose input needs no gradient ran
        nothing: it saves nothing); block 0's ends a pass."""
        if self.recording:
            self._saved.setdefault(index, 0)
        if index == 0:
            self._passes += 1

    @contextlib.contextmanager
    def counting(self, index: int) -> Iterator[None]:
        """Counts the bytes that offloading would move for what the body's graph saves."""
        if not self.recording or index in self._saved:
            yield
            return
        keep = self.weights()
        # Autograd keeps the pack hook with every tensor it saved through it, until the graph is
        # freed: the tensors seen go through a box emptied when the body ends, so the hook does
        # not hold them past the body. Backward frees each saved tensor once it is used; held
        # here, a block's whole graph stayed until its backward ended, and the measuring pass
        # peaked higher than recomputing does (an MLP-wide tensor on the CPU; on the H100 the
        # 6.7B shape's peak at 128K was 5.9 GiB over the recompute's, which left no room to keep).
        box: list[dict[tuple, torch.Tensor] | None] = [{}]

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen = box[0]
            if seen is not None and t.device == self.device.torch and storage_key(t) not in keep:
                seen[(storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)] = t
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            yield
        seen, box[0] = box[0], None
        assert seen is not None
        self._saved[index] = Packing(list(seen.values())).nbytes

    def add_boundary(self, index: int, nbytes: int) -> None:
        """Boundary-state bytes of one block that go through the host link (host or nvme tier)."""
        if self.recording:
            self.traffic.boundary[index] = nbytes

    def _mark(self) -> Any:
        if self.device.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.device.compute_stream())
            return ev
        return time.perf_counter()

    def _between(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end) / 1e3) if self.device.cuda else float(end - start)

    def _seconds(self, index: int, phase: str) -> float:
        span = self._times.get((index, phase))
        return self._between(*span) if span is not None and len(span) == 2 else 0.0

    def costs(self) -> list[BlockCost]:
        """Each block's measured costs (the measured step's events must have completed)."""
        out = []
        for i in range(self.blocks):
            fwd = self._seconds(i, _FORWARD)
            probe = self._attention.get(i)
            keepable = probe is not None and probe.calls > 0 and probe.keepable
            out.append(
                BlockCost(
                    fwd,
                    max(self._seconds(i, _BACKWARD) - fwd, 0.0),
                    self._saved[i],
                    min(probe.seconds(), fwd) if keepable and probe is not None else 0.0,
                    probe.nbytes if keepable and probe is not None else 0,
                )
            )
        return out

    def bounds(self, measured_s: float | None = None) -> Bounds:
        """The CPU optimizer's busy time over the measured pass's wall time (from its start to
        now, the next pass's start: what the CPU does in a step of a steady run), the GPU time
        between the last block's forward and its backward (head and loss), the measured pass's
        wall time (measured_s), and the seconds the disk was busy writing the boundary states
        (forward) and reading them back (backward) in the measured pass (nvme; else 0)."""
        cpu = 0.0
        if self.optimizer_busy is not None and self._busy_start is not None:
            # Over the measured pass's wall time: in a steady run the updates that spill into
            # the next pass match those that spilled into this one.
            cpu = self.optimizer_busy() - self._busy_start
        last = self.blocks - 1
        fwd, bwd = self._times.get((last, _FORWARD)), self._times.get((last, _BACKWARD))
        other = self._between(fwd[1], bwd[0]) if fwd and bwd and len(fwd) == 2 else 0.0
        written, read = (0.0, 0.0) if self.disk is None else (self.disk[0].seconds, self.disk[1].seconds)
        return Bounds(
            cpu_s=cpu,
            other_s=max(other, 0.0),
            measured_s=measured_s,
            disk_forward_s=written,
            disk_backward_s=read,
        )

    def room(self) -> tuple[int | None, int]:
        """(device bytes, host bytes) the kept tensors may take. Device, on CUDA:
        :func:`device_room` of what the driver and the caching allocator report now; on the
        CPU, where the device is host memory, budgets.gpu_bytes less the plan's other gpu bytes
        (device_need), else the host's free memory less HOST_MARGIN_BYTES. Host:
        :func:`host_room`."""
        free = _host_free()
        host = host_room(self.budgets)
        if not self.device.cuda:
            gpu = self.budgets.gpu_bytes
            return (free if gpu is None else max(gpu - self.device_need, 0)), host
        dev = self.device.torch
        device_free, total = torch.cuda.mem_get_info(dev)
        reserved, peak = torch.cuda.memory_reserved(dev), torch.cuda.max_memory_reserved(dev)
        return device_room(total, device_free, reserved, peak, self.budgets.gpu_bytes), host

    def _decide(self, measured_s: float) -> Choice:
        lap = _Laps(self.decide_s)
        self.device.synchronize()  # the events of the measured step must have completed
        lap("sync")
        costs, bounds = self.costs(), self.bounds(measured_s)
        device_bytes, host_bytes = self.room()
        lap("costs")
        h2d, d2h = measure_link(self.device.torch)
        link = self.traffic.link(h2d, d2h, measure_duplex(self.device.torch))
        lap("link")
        staging = self._staging()
        if staging is None:
            choice = choose(costs, link, host_bytes, device_bytes, bounds)
        else:
            choice = choose_staged(costs, link, host_bytes, device_bytes, bounds, staging)
        lap("choose")
        if staging is not None and choice.extra_leases:
            assert self.traffic.staging is not None
            self.traffic.staging.grow_to(
                staging.leases + choice.extra_leases, "chosen with the keeps (offload_saved auto)"
            )
            lap("staging")
        return choice

    def _staging(self) -> Staging | None:
        """The NVMe store's staging leases and the disk's time per group, as measured (None:
        the boundary states are not on nvme, or nothing was written)."""
        store = self.traffic.staging
        if store is None or self.disk is None or not store.lease_bytes or not self.disk[0].nbytes:
            return None
        written, read = self.disk
        per = store.lease_bytes
        write_s = written.seconds * per / written.nbytes
        read_s = read.seconds * per / read.nbytes if read.nbytes else write_s
        groups = len(self.traffic.boundary)
        return Staging(store.staging, per, groups, write_s, read_s)


class _Laps:
    """Adds the seconds since the last call to into[name]."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.last = now


def _host_free() -> int:
    """The host's available memory less HOST_MARGIN_BYTES."""
    return max(psutil.virtual_memory().available - HOST_MARGIN_BYTES, 0)


def host_room(budgets: BudgetsConfig) -> int:
    """Host bytes kept tensors or staging may still take: the host's free memory less
    HOST_MARGIN_BYTES (pinned memory cannot be swapped out), and no more than budgets.host_bytes
    less what the process holds now."""
    free = _host_free()
    if budgets.host_bytes is None:
        return free
    return max(min(free, budgets.host_bytes - psutil.Process().memory_info().rss), 0)


def device_room(total: int, free: int, reserved: int, peak: int, budget: int | None = None) -> int:
    """Device bytes kept tensors may take on a CUDA device of total bytes, free of which the
    driver reports free now (torch.cuda.mem_get_info), of which the caching allocator reserves
    reserved now and reserved peak at most since its peak statistics were last reset (the
    measured step's, or earlier): the device (or budget, if smaller) less

    - what lies outside the allocator (total - free - reserved: the CUDA context, libraries'
      workspaces, other processes), which the allocator's figures do not show;
    - the margin (offload.plan.recompute.keep_margin: 8% of the device, at least 2 GiB);
    - the peak the allocator reserved, not only what tensors took at once: kept groups of a few
      GiB each need room beside its cached blocks, which they may not fit.

    The planner's estimate of a choice adds, to the device-kept tensors, a window of host-kept
    groups and one group more for the allocator (offload.plan.recompute.SAVED_HELD)."""
    outside = max(total - free - reserved, 0)
    capacity = total if budget is None else min(budget, total)
    return max(capacity - outside - keep_margin(capacity) - peak, 0)


def make_choice(
    spec: Spec,
    device: Device,
    blocks: int,
    traffic: Traffic,
    weights: Callable[[], set[int]],
    budgets: BudgetsConfig | None = None,
    optimizer_busy: Callable[[], float] | None = None,
    device_need: int = 0,
) -> Chooser | None:
    """The choice of ``placement.offload_saved``; None for "never"."""
    if spec == "never":
        return None
    if spec == "auto":
        return MeasuredChoice(device, blocks, traffic, weights, budgets, optimizer_busy, device_need)
    if spec == "always":
        return lambda index: Keep.HOST
    kinds = {"host": spec} if isinstance(spec, list) else dict(spec)
    keep: dict[int, Keep] = {}
    for kind, listed in kinds.items():
        for i, block in enumerate(listed):
            if block >= blocks:
                where = (
                    f"placement.offload_saved[{i}]"
                    if isinstance(spec, list)
                    else f"placement.offload_saved.{kind}[{i}]"
                )
                raise ConfigError(where, block, f"the model has {blocks} blocks (0 to {blocks - 1})")
            keep[block] = Keep(kind)
    return lambda index: keep.get(index, Keep.RECOMPUTE)
