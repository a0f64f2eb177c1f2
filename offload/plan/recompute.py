"""Recompute, keep or offload, per block: the choice that minimises the estimated step time.

By default a streamed block is recomputed in backward, which costs its forward compute again.
What a block can do instead (``Keep``), fastest first:

- ``device``: keep its whole autograd graph on the device: no copy, no recompute, but its saved
  tensors (about 160 KB per token for a 6.7B Llama block in bf16) hold device memory until its
  backward.
- ``host``: keep the graph with its saved tensors in pinned host memory (SSDTrain): copied out
  during forward and back during backward, over the host link that the weight stream also uses.
- ``attention`` / ``attention_host``: keep only the attention's output and log-sum-exp (about
  8 KB per token), on the device or in host memory, and recompute the rest of the block: the
  recompute skips the attention forward, the part that grows with the square of the sequence.
- ``recompute``: keep nothing.

This module is the cost model and the choice, pure arithmetic: the runtime feeds it the first
step's measurements (``placement.offload_saved: auto``), ``offload plan`` feeds it estimates.
A step is the slowest of what runs side by side: the GPU's two phases, each the slowest of its
compute, the host link and the disk, and the CPU optimizer's updates of the streamed blocks (which
overlap backward and the next forward)::

    forward  = max(sum F,                         link(H2D_fwd, D2H_fwd + moved),  disk_fwd)
    backward = max(sum B + sum_rec F + sum_att (F - A),  link(H2D_bwd + moved, D2H_bwd),  disk_bwd)
    step     = max(forward + backward + other + wait,    cpu)

with F a block's forward, B its backward proper, A its attention forward, ``moved`` the bytes
of the host-kept blocks, ``other`` the GPU time outside the blocks (embedding, head, loss) and
``wait`` the GPU's wait for the CPU updates the next forward needs first (a plan's estimate),
``link(h, d)`` the slowest of h at the host-to-device rate, d at the device-to-host rate and
h + d at the rate both directions reach together (they share the PCIe link). ``disk_fwd`` and
``disk_bwd`` are the disk's time to write the boundary states in forward and read them back in
backward (``placement.activations: nvme``; 0 otherwise): a phase that waits for the disk gets no
faster when a keep skips compute. When the step recomputing every block was measured (auto),
what the model does not explain of it (launch gaps, overlap that is not perfect) is added to
every estimate, so gains are fractions of the real step.

With the boundary states on NVMe, the store's pinned staging leases decide how far the forward
may run ahead of the disk: each group more in a lease takes one group's write out of the forward
(it goes on during backward, where the groups still in leases are not read back). Staging and
host keeps draw on the same host memory, so :func:`choose_staged` tries staging counts from none
to what lets the forward run at its compute's pace, each with the host room it leaves to keeps,
and takes the fastest step (a lease buys a group's write, 0.5 s a GiB at 2 GB/s, where a host
attention keep at 128K buys its attention forward, 0.26 s a GiB on the H100).

Every count of blocks of each kind is tried (with as many device attention keeps as fit: they
cost no link time); the device kinds must fit ``device_bytes`` with a window of host groups in
flight and one more for the allocator (``SAVED_HELD``), the host kinds ``host_bytes``. The
host-kept blocks are then spread evenly over the blocks, so that each copy overlaps the blocks
up to the next host-kept one (the store lets one copy out be in flight at a put), and the device
graphs take the last blocks left (:meth:`_Split.keep`). A choice that saves less than ``MIN_GAIN`` of the step is not taken: every block recomputes, and the choice
says why (a step bound by the CPU optimizer or the link gains nothing from skipping compute).
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

MIN_GAIN = 0.10
"""The smallest estimated gain (a fraction of the step) for which blocks skip their recompute."""

SAVED_WINDOW = 2
"""Host-kept groups (of each kind) the runtime holds on the device at once besides the
device-kept ones: in forward the one being copied out and the one being made (the store waits
for the copy before it at each put, and lets go of that group before queueing the next copy);
in backward the one in use and the one coming back (allocated on the compute stream, so it
takes the memory of the group before it)."""

SAVED_HELD = SAVED_WINDOW + 1
"""Host-kept groups of each kind the estimates count on the device: the window and one more for
the caching allocator. A group comes back in backward as one contiguous buffer (a few GiB at
long sequences), which the memory its tensors took one by one in forward, freed one by one and
cached, need not fit: the allocator may reserve new memory beside it."""

KEEP_MARGIN_BYTES = 2 << 30
"""The least device memory a choice leaves free (see :func:`keep_margin`)."""

KEEP_MARGIN_FRACTION = 0.08
"""... and the share of the device it leaves free, when that is more: allocator rounding and
fragmentation, and the step's transients that the measured step did not reach, grow with the
device and the sequence."""


def keep_margin(capacity: int) -> int:
    """Device bytes a choice leaves free on a device (or budget) of capacity bytes: the larger
    of KEEP_MARGIN_BYTES and KEEP_MARGIN_FRACTION of it."""
    return max(KEEP_MARGIN_BYTES, int(capacity * KEEP_MARGIN_FRACTION))


class Keep(str, enum.Enum):
    """What one block keeps from its forward for its backward (see the module docstring)."""

    RECOMPUTE = "recompute"
    DEVICE = "device"
    HOST = "host"
    ATTENTION = "attention"
    ATTENTION_HOST = "attention_host"

    def __str__(self) -> str:
        return self.value

    @property
    def graph(self) -> bool:
        """The block keeps its whole graph (runs its forward with autograd)."""
        return self in (Keep.DEVICE, Keep.HOST)

    @property
    def attention(self) -> bool:
        return self in (Keep.ATTENTION, Keep.ATTENTION_HOST)

    @property
    def on_host(self) -> bool:
        return self in (Keep.HOST, Keep.ATTENTION_HOST)


@dataclass(frozen=True, slots=True)
class BlockCost:
    """What one block costs each way."""

    forward_s: float
    """One forward of the block: what recomputing it costs."""
    backward_s: float
    """Its backward, without the recompute."""
    saved_bytes: int
    """Bytes of its saved tensors (weights excluded, storages once): what ``device`` holds and
    ``host`` moves each way."""
    attention_s: float = 0.0
    """The attention forward inside forward_s: what ``attention`` saves."""
    attention_bytes: int = 0
    """Bytes of the attention outputs and log-sum-exps; 0: its attention cannot be kept (no fused
    kernel with a log-sum-exp, dropout, a mask)."""


@dataclass(frozen=True, slots=True)
class Link:
    """The host link's rates in bytes per second, and what else crosses it each step."""

    h2d_bytes_s: float
    d2h_bytes_s: float
    h2d_forward: int = 0
    """Bytes copied host-to-device during forward (weight uploads)."""
    h2d_backward: int = 0
    """... during backward (weight uploads, boundary states coming back)."""
    d2h_forward: int = 0
    """Bytes copied device-to-host during forward (boundary states going out)."""
    d2h_backward: int = 0
    """... during backward (gradients)."""
    duplex_bytes_s: float | None = None
    """Both directions together (PCIe: less than the sum of the two); None: the sum."""

    def __post_init__(self) -> None:
        if not (self.h2d_bytes_s > 0 and self.d2h_bytes_s > 0):
            raise ValueError(f"link rates must be > 0 bytes/s, got {self.h2d_bytes_s}, {self.d2h_bytes_s}")
        if self.duplex_bytes_s is not None and self.duplex_bytes_s <= 0:
            raise ValueError(f"the duplex rate must be > 0 bytes/s, got {self.duplex_bytes_s}")

    def seconds(self, h2d: float, d2h: float) -> float:
        """Time to move h2d bytes one way and d2h the other, side by side."""
        t = max(h2d / self.h2d_bytes_s, d2h / self.d2h_bytes_s)
        if self.duplex_bytes_s is not None:
            t = max(t, (h2d + d2h) / self.duplex_bytes_s)
        return t


@dataclass(frozen=True, slots=True)
class Bounds:
    """What bounds the step besides the blocks: the CPU optimizer and the GPU's other work."""

    cpu_s: float = 0.0
    """The CPU optimizer's updates of one step (the streamed blocks, and host residents)."""
    other_s: float = 0.0
    """GPU time outside the blocks (embedding, head and loss, forward and backward)."""
    measured_s: float | None = None
    """The step as measured recomputing every block (auto's measured pass; None: not measured).
    What the model does not explain of it (launch gaps, overlap that is not perfect) is added to
    every estimate, so a gain is a fraction of the real step."""
    slack_s: float = 0.0
    """That unexplained time (:func:`calibrated` sets it)."""
    disk_forward_s: float = 0.0
    """The disk's time to write the boundary states of one forward (``activations: nvme``): the
    forward phase lasts at least this long."""
    disk_backward_s: float = 0.0
    """The disk's time to read them back in backward: the backward phase lasts at least this long."""
    wait_s: float = 0.0
    """The GPU's wait between a step's backward and the next forward for the CPU updates that
    forward needs first (plans: :func:`offload.plan.activations.recompute_choice`; auto's
    measured pass holds it in its slack)."""

    def __post_init__(self) -> None:
        for name in ("disk_forward_s", "disk_backward_s", "wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 s, got {getattr(self, name)}")


def calibrated(costs: Sequence[BlockCost], link: Link, bounds: Bounds) -> Bounds:
    """bounds with slack_s = what its measured step has beyond the model's (0 when not measured)."""
    if bounds.measured_s is None:
        return bounds
    model = estimate(costs, link, [Keep.RECOMPUTE] * len(costs), replace(bounds, slack_s=0.0))
    return replace(bounds, slack_s=max(bounds.measured_s - model.step_s, 0.0))


Terms = tuple[float, float, float]  # one phase's (compute, link, disk) seconds


@dataclass(frozen=True, slots=True)
class Estimate:
    """The model's figures for one choice."""

    step_s: float
    forward_s: float
    """The forward phase: the slowest of its compute and its link traffic."""
    backward_s: float
    gpu_s: float
    """forward + backward + other."""
    cpu_s: float
    link_bound: bool
    """A phase waits for the link rather than compute (or the disk)."""
    disk_bound: bool = False
    """A phase waits for the disk rather than compute or the link."""
    terms: tuple[Terms, Terms] = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    """(forward, backward): each phase's compute, link and disk seconds (the phase is the longest)."""

    @property
    def bound(self) -> str:
        """What the step waits for; a phase bound by the disk is named before one bound by the
        link (more of the disk's bytes cannot move on a faster link)."""
        if self.cpu_s >= self.gpu_s:
            return "the CPU optimizer"
        if self.disk_bound:
            return "the disk"
        return "the host link" if self.link_bound else "GPU compute"


def estimate(
    costs: Sequence[BlockCost], link: Link, keep: Sequence[Keep], bounds: Bounds | None = None
) -> Estimate:
    """The model's step (seconds, see the module docstring) when block i keeps keep[i]."""
    bounds = bounds or Bounds()
    moved = sum(_host_bytes(c, k) for c, k in zip(costs, keep))
    fwd_compute = sum(c.forward_s for c in costs)
    bwd_compute = sum(c.backward_s + _recomputed(c, k) for c, k in zip(costs, keep))
    return _estimate(fwd_compute, bwd_compute, moved, link, bounds)


def step_time(
    costs: Sequence[BlockCost], link: Link, keep: Sequence[Keep], bounds: Bounds | None = None
) -> float:
    return estimate(costs, link, keep, bounds).step_s


def _estimate(fwd_compute: float, bwd_compute: float, moved: int, link: Link, b: Bounds) -> Estimate:
    phases = _terms(fwd_compute, bwd_compute, moved, link, b)
    forward, backward = (max(p) for p in phases)
    gpu = forward + backward + b.other_s + b.wait_s
    link_bound = any(lk > c and lk >= d for c, lk, d in phases)
    disk_bound = any(d > c and d > lk for c, lk, d in phases)
    return Estimate(
        max(gpu, b.cpu_s) + b.slack_s, forward, backward, gpu, b.cpu_s, link_bound, disk_bound, phases
    )


def _terms(fwd_compute: float, bwd_compute: float, moved: int, link: Link, b: Bounds) -> tuple[Terms, Terms]:
    """(forward, backward): each phase's compute, link and disk time; the phase lasts the longest."""
    fwd_link = link.seconds(link.h2d_forward, link.d2h_forward + moved)
    bwd_link = link.seconds(link.h2d_backward + moved, link.d2h_backward)
    return (fwd_compute, fwd_link, b.disk_forward_s), (bwd_compute, bwd_link, b.disk_backward_s)


def _recomputed(c: BlockCost, k: Keep) -> float:
    if k is Keep.RECOMPUTE:
        return c.forward_s
    if k.attention:
        return max(c.forward_s - c.attention_s, 0.0)
    return 0.0


def _host_bytes(c: BlockCost, k: Keep) -> int:
    return c.saved_bytes if k is Keep.HOST else c.attention_bytes if k is Keep.ATTENTION_HOST else 0


def device_bytes(costs: Sequence[BlockCost], keep: Sequence[Keep], window: int = SAVED_HELD) -> int:
    """Device bytes a choice holds at its peak: the device-kept graphs and attention outputs,
    and ``window`` of the largest host-kept groups of each kind (SAVED_HELD: the runtime's
    window and one for the allocator)."""
    held = sum(c.saved_bytes for c, k in zip(costs, keep) if k is Keep.DEVICE)
    held += sum(c.attention_bytes for c, k in zip(costs, keep) if k is Keep.ATTENTION)
    host = [c.saved_bytes for c, k in zip(costs, keep) if k is Keep.HOST]
    att = [c.attention_bytes for c, k in zip(costs, keep) if k is Keep.ATTENTION_HOST]
    return held + window * (max(host, default=0) + max(att, default=0))


def host_bytes(costs: Sequence[BlockCost], keep: Sequence[Keep]) -> int:
    return sum(_host_bytes(c, k) for c, k in zip(costs, keep))


_moved, _held = host_bytes, device_bytes  # for choose(), whose budgets take these names


@dataclass(frozen=True, slots=True)
class Choice:
    """What each block keeps, and the step times the model predicts."""

    keep: tuple[Keep, ...]
    step_s: float
    """Estimated step time with this choice."""
    recompute_step_s: float
    """Estimated step time recomputing every block."""
    offloaded_bytes: int
    """Host bytes of the host-kept blocks (whole graphs and attention outputs)."""
    device_bytes: int = 0
    """Device bytes the choice holds at its peak (:func:`device_bytes`)."""
    bound: str = ""
    """What bounds the step recomputing every block (:attr:`Estimate.bound`)."""
    reason: str = ""
    """Why nothing is kept although something could be (the gain is under MIN_GAIN)."""
    slack_s: float = 0.0
    """Time of the measured step the model does not explain (in both step estimates)."""
    kept_bound: str = ""
    """What bounds the step with this choice ("": as recomputing, or nothing kept)."""
    phases: dict[str, float] = field(default_factory=dict)
    """The model's parts, seconds: each phase's compute, link and disk time recomputing every
    block (``recompute_*``) and with this choice (``kept_*``), and the GPU time outside the
    blocks and the CPU optimizer's (:func:`phases`): where an estimate and a measured step part,
    these say which term was off."""
    measured_step_s: float | None = None
    """The step as measured with this choice (auto measures one after a warm-up; None: not yet)."""
    reverted: str = ""
    """Why auto went back to recomputing every block after measuring this choice ("": it did not)."""
    staging: str = ""
    """How many more NVMe staging leases the choice takes, and why ("": none; both step
    estimates count them)."""
    extra_leases: int = 0
    """That many NVMe staging leases more (:func:`choose_staged`)."""
    recompute_measured_s: float | None = None
    """The pass recomputing every block that the choice's measured pass is compared with: the
    pass the choice was made from, or, where the choice grew the staging leases, one more pass
    recomputing with them (None: not measured yet)."""

    @property
    def offload(self) -> tuple[bool, ...]:
        """Per block: whether it keeps anything (is not wholly recomputed)."""
        return tuple(k is not Keep.RECOMPUTE for k in self.keep)

    @property
    def blocks(self) -> list[int]:
        """The blocks that keep something."""
        return [i for i, k in enumerate(self.keep) if k is not Keep.RECOMPUTE]

    def of(self, kind: Keep) -> list[int]:
        return [i for i, k in enumerate(self.keep) if k is kind]

    @property
    def gain(self) -> float:
        return 1 - self.step_s / self.recompute_step_s if self.recompute_step_s > 0 else 0.0

    def describe(self) -> str:
        """One line: what each block keeps, the estimated steps and what bounds them."""
        slack = f", {self.slack_s:.3f} s of it outside the model" if self.slack_s > 0 else ""
        wait = self.phases.get("wait_s", 0.0)
        if wait > 0:
            slack += f", {wait:.3f} s of it waiting for the CPU's updates before the next forward"
        staging = f"; {self.staging}" if self.staging else ""
        if self.reverted:
            return f"recompute every block: {self.reverted}{staging}"
        if not self.blocks:
            why = f": {self.reason}" if self.reason else ""
            return (
                f"recompute every block (est. step {self.recompute_step_s:.3f} s{slack}, "
                f"bound by {self.bound}){why}{staging}"
            )
        parts = [f"{_NAMES[k]} {_count(self.of(k))}: {ranges(self.of(k))}" for k in _ORDER if self.of(k)]
        kept = f", the choice by {self.kept_bound}" if self.kept_bound not in ("", self.bound) else ""
        measured = ""
        if self.measured_step_s is not None and self.recompute_measured_s is not None:
            measured = (
                f"; measured {self.measured_step_s:.3f} s against {self.recompute_measured_s:.3f} s "
                f"recomputing, {1 - self.measured_step_s / self.recompute_measured_s:.0%} faster"
            )
        elif self.measured_step_s is not None:
            measured = f"; measured {self.measured_step_s:.3f} s"
        return (
            f"{'; '.join(parts)} (est. step {self.step_s:.3f} s against {self.recompute_step_s:.3f} s "
            f"recomputing{slack}, {self.gain:.0%} faster{measured}; recomputing is bound by {self.bound}{kept})"
            f"{staging}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "keep": [str(k) for k in self.keep],
            "blocks": self.blocks,
            **{str(k): self.of(k) for k in Keep},
            "step_s": self.step_s,
            "recompute_step_s": self.recompute_step_s,
            "saved_bytes": self.offloaded_bytes,
            "device_bytes": self.device_bytes,
            "bound": self.bound,
            "kept_bound": self.kept_bound or self.bound,
            "reason": self.reason,
            "slack_s": self.slack_s,
            "phases": dict(self.phases),
            "measured_step_s": self.measured_step_s,
            "reverted": self.reverted,
            "staging": self.staging,
            "extra_leases": self.extra_leases,
            "recompute_measured_s": self.recompute_measured_s,
        }


_ORDER = (Keep.DEVICE, Keep.HOST, Keep.ATTENTION, Keep.ATTENTION_HOST, Keep.RECOMPUTE)
_NAMES = {
    Keep.DEVICE: "keep on the device",
    Keep.HOST: "offload to host",
    Keep.ATTENTION: "keep attention on the device",
    Keep.ATTENTION_HOST: "keep attention on host",
    Keep.RECOMPUTE: "recompute",
}


def fixed(
    costs: Sequence[BlockCost],
    link: Link,
    keep: Sequence[Keep],
    bounds: Bounds | None = None,
    window: int = SAVED_HELD,
) -> Choice:
    """The Choice of a given keep (a list in placement.offload_saved), with its estimate."""
    bounds = calibrated(costs, link, bounds or Bounds())
    base = estimate(costs, link, [Keep.RECOMPUTE] * len(costs), bounds)
    kept = estimate(costs, link, keep, bounds)
    return Choice(
        tuple(keep),
        kept.step_s,
        base.step_s,
        host_bytes(costs, keep),
        device_bytes(costs, keep, window),
        base.bound,
        slack_s=bounds.slack_s,
        kept_bound=kept.bound if any(k is not Keep.RECOMPUTE for k in keep) else "",
        phases=phases(base, kept, bounds),
    )


def choose(
    costs: Sequence[BlockCost],
    link: Link,
    host_bytes: int | None = None,
    device_bytes: int | None = None,
    bounds: Bounds | None = None,
    min_gain: float = MIN_GAIN,
    window: int = SAVED_HELD,
) -> Choice:
    """The keep that minimises the step within host_bytes and device_bytes (None: no limit; the
    device holds ``window`` host-kept groups of each kind too). Ties go to fewer host bytes, then fewer
    device bytes. A gain under min_gain keeps nothing (see the module docstring)."""
    n = len(costs)
    bounds = calibrated(costs, link, bounds or Bounds())
    base = estimate(costs, link, [Keep.RECOMPUTE] * n, bounds)
    nothing = Choice(
        (Keep.RECOMPUTE,) * n,
        base.step_s,
        base.step_s,
        0,
        0,
        base.bound,
        slack_s=bounds.slack_s,
        phases=phases(base, base, bounds),
    )
    best: tuple[tuple[float, int, int], _Split] | None = None  # the best split keeping something
    for key, split in _splits(costs, link, bounds, host_bytes, device_bytes, window):
        if split.keeps and (best is None or key < best[0]):
            best = key, split
    if best is None:
        return replace(nothing, reason=_none_fits(costs, host_bytes, device_bytes, window))
    split = best[1]
    keep = split.keep(costs)
    kept = estimate(costs, link, keep, bounds)
    choice = replace(
        nothing,
        keep=tuple(keep),
        step_s=kept.step_s,
        offloaded_bytes=_moved(costs, keep),
        device_bytes=_held(costs, keep, window),
        kept_bound=kept.bound,
        phases=phases(base, kept, bounds),
    )
    if choice.gain < min_gain:
        return replace(nothing, reason=_why_not(choice, base, bounds, min_gain))
    return choice


@dataclass(frozen=True, slots=True)
class Staging:
    """The NVMe store's staging leases as measured: how many there are (``leases``), one's bytes,
    the groups a forward puts (the most leases there may be: with as many, nothing is read
    back), and the disk's seconds to write and to read one group."""

    leases: int
    lease_bytes: int
    groups: int
    write_s: float
    read_s: float

    def bounds(self, bounds: Bounds, extra: int) -> Bounds:
        """bounds with extra leases more: as many groups' writes move from forward to backward,
        and as many groups are not read back."""
        moved = min(extra * self.write_s, bounds.disk_forward_s)
        back = max(bounds.disk_backward_s - extra * self.read_s, 0.0) + moved
        return replace(bounds, disk_forward_s=bounds.disk_forward_s - moved, disk_backward_s=back)

    def needed(self, forward_compute_s: float, disk_forward_s: float) -> int:
        """Leases more for the forward to run at its compute's pace: the disk falls behind by
        the groups it has not written when compute is done."""
        if disk_forward_s <= forward_compute_s or self.write_s <= 0 or self.leases >= self.groups:
            return 0
        return min(math.ceil((disk_forward_s - forward_compute_s) / self.write_s), self.groups - self.leases)


STAGING_TRIES = 8
"""Staging counts :func:`choose_staged` tries between none more and what the forward needs."""


def choose_staged(
    costs: Sequence[BlockCost],
    link: Link,
    host_bytes: int | None,
    device_bytes: int | None,
    bounds: Bounds,
    staging: Staging,
    min_gain: float = MIN_GAIN,
    window: int = SAVED_HELD,
) -> Choice:
    """The choice, with its leases more (``extra_leases``), that minimises the step: :func:`choose`
    for each count of leases more, from none to what the forward needs, within host_bytes with
    what they take. The unexplained time of the measured step (taken with ``staging.leases``) is
    fixed first, so it does not absorb what the leases change."""
    bounds = calibrated(costs, link, bounds)
    fixed_bounds = replace(bounds, measured_s=None)
    need = staging.needed(sum(c.forward_s for c in costs), bounds.disk_forward_s)
    if host_bytes is not None:
        need = min(need, host_bytes // max(staging.lease_bytes, 1))
    tries = sorted({round(need * i / STAGING_TRIES) for i in range(STAGING_TRIES + 1)})
    best: tuple[Choice, int] | None = None
    for extra in tries:
        room = None if host_bytes is None else host_bytes - extra * staging.lease_bytes
        c = choose(costs, link, room, device_bytes, staging.bounds(fixed_bounds, extra), min_gain, window)
        if best is None or c.step_s < best[0].step_s - 1e-9:
            best = c, extra
    assert best is not None
    choice, extra = best
    if not extra:
        return choice
    return replace(
        choice,
        extra_leases=extra,
        staging=(
            f"staging {staging.leases} -> {staging.leases + extra} leases "
            f"({extra * staging.lease_bytes / 2**30:.1f} GiB more): the forward runs "
            f"{extra * staging.write_s:.2f} s further ahead of the disk"
        ),
    )


def phases(base: Estimate, kept: Estimate, bounds: Bounds) -> dict[str, float]:
    """The terms of the model, seconds: of base (recomputing every block, ``recompute_``) and of
    kept (the choice, ``kept_``), each phase's compute, link and disk time; and the GPU time
    outside the blocks, the CPU optimizer's time and the slack (the measured step's unexplained
    part); and a plan's wait for the updates the next forward needs first, where there is one."""
    out = {"other_s": bounds.other_s, "cpu_s": bounds.cpu_s, "slack_s": bounds.slack_s}
    if bounds.wait_s:
        out["wait_s"] = bounds.wait_s
    for name, e in (("recompute", base), ("kept", kept)):
        for phase, values in zip(("forward", "backward"), e.terms):
            for term, value in zip(("compute", "link", "disk"), values):
                out[f"{name}_{phase}_{term}_s"] = value
    return out


def _none_fits(costs: Sequence[BlockCost], host: int | None, device: int | None, window: int) -> str:
    """Why no block keeps anything though gains were not weighed: what the smallest keep of each
    kind would need against the room there is."""
    if not costs:
        return "no blocks"
    gib = 1 << 30
    needs = []
    for kind in (Keep.ATTENTION, Keep.ATTENTION_HOST, Keep.DEVICE, Keep.HOST):
        if kind.attention and not any(c.attention_bytes for c in costs):
            continue
        i = min(
            (j for j, c in enumerate(costs) if not kind.attention or c.attention_bytes),
            key=lambda j: costs[j].attention_bytes if kind.attention else costs[j].saved_bytes,
        )
        keep = [Keep.RECOMPUTE] * len(costs)
        keep[i] = kind
        need = f"{kind} {device_bytes(costs, keep, window) / gib:.2f} GiB of device"
        needs.append(need + (f", {host_bytes(costs, keep) / gib:.2f} GiB of host" if kind.on_host else ""))
    room = ", ".join(
        f"{name} {'unlimited' if b is None else f'{b / gib:.2f} GiB'}"
        for name, b in (("device", device), ("host", host))
    )
    return f"no keep fits the room left ({room}); one block's keep needs: {'; '.join(needs)}"


def _why_not(choice: Choice, base: Estimate, bounds: Bounds, min_gain: float) -> str:
    parts = [f"{len(choice.of(k))} {k}" for k in _ORDER[:-1] if choice.of(k)]
    why = (
        f"the best keep ({', '.join(parts)}) would save {max(choice.gain, 0.0):.1%} of the step, "
        f"under the {min_gain:.0%} threshold"
    )
    if base.bound == "the CPU optimizer":
        why += f"; the CPU optimizer's {base.cpu_s:.3f} s of updates outlast the GPU's {base.gpu_s:.3f} s"
    elif base.bound == "the disk":
        why += (
            f"; the disk, {bounds.disk_forward_s:.3f} s writing the boundary states in forward and "
            f"{bounds.disk_backward_s:.3f} s reading them back, bounds the GPU's phases"
        )
    return why


@dataclass(frozen=True, slots=True)
class _Split:
    """How many blocks keep each kind; :meth:`keep` says which. The search prices a split as if
    the host graphs were the first blocks, the device graphs the last and the attention keeps
    (host first) the attention-keepable blocks in between, which is exact when the blocks cost
    alike (the blocks of one model do)."""

    n: int
    device: int = 0
    host: int = 0
    att_device: int = 0
    att_host: int = 0

    @property
    def keeps(self) -> bool:
        return bool(self.device or self.host or self.att_device or self.att_host)

    def keep(self, costs: Sequence[BlockCost]) -> list[Keep]:
        """Which blocks keep what. Host-kept blocks are spread evenly over the blocks: the store
        lets one copy out be in flight when the next host group is put, so a copy overlaps every
        block up to the next host-kept one, and spread out the copies keep pace with compute
        where they would stall it bunched together (and likewise coming back in backward).
        Device graphs take the last blocks left (their backward runs first and frees them
        first); device attention keeps the attention-keepable blocks left."""
        keep = [Keep.RECOMPUTE] * self.n

        def place(kind: Keep, count: int, among: list[int]) -> None:
            for i in _spread(among, count):
                keep[i] = kind

        def free(keepable: bool = False) -> list[int]:
            return [
                i
                for i in range(self.n)
                if keep[i] is Keep.RECOMPUTE and (not keepable or costs[i].attention_bytes > 0)
            ]

        place(Keep.HOST, self.host, free())
        place(Keep.ATTENTION_HOST, self.att_host, free(keepable=True))
        for i in free()[self.n :: -1][: self.device]:
            keep[i] = Keep.DEVICE
        for i in free(keepable=True)[: self.att_device]:
            keep[i] = Keep.ATTENTION
        return keep


def _spread(among: list[int], count: int) -> list[int]:
    """count of the positions in among, evenly spaced, the first included."""
    count = min(count, len(among))
    return [among[j * len(among) // count] for j in range(count)]


def _splits(
    costs: Sequence[BlockCost],
    link: Link,
    bounds: Bounds,
    host_bytes: int | None,
    device_bytes: int | None,
    window: int,
) -> Iterator[tuple[tuple[float, int, int], _Split]]:
    """Every split that fits the budgets, with as many device attention keeps as fit (they cost
    no link time and never slow a step), and its key: (step, host bytes, device bytes). Sums over
    positions come from prefix sums, so each split costs O(log n)."""
    n = len(costs)
    dev_room = float("inf") if device_bytes is None else device_bytes
    host_room = float("inf") if host_bytes is None else host_bytes
    keepable = [i for i, c in enumerate(costs) if c.attention_bytes > 0]
    att = _prefix(costs[i].attention_bytes for i in keepable)
    att_s = _prefix(costs[i].attention_s for i in keepable)
    saved = _prefix(c.saved_bytes for c in costs)
    fwd = _prefix(c.forward_s for c in costs)
    peak = list(itertools.accumulate((c.saved_bytes for c in costs), max, initial=0))
    fwd_compute = fwd[n]
    bwd_all = sum(c.backward_s for c in costs) + fwd[n]  # every block recomputed
    for d in range(n + 1):
        tail = saved[n] - saved[n - d]
        for h in range(n - d + 1):
            head = saved[h]
            graph_peak = window * peak[h]
            if tail + graph_peak > dev_room or head > host_room:
                continue
            skipped = fwd[h] + fwd[n] - fwd[n - d]  # the graph-kept blocks' recompute
            lo, hi = bisect.bisect_left(keepable, h), bisect.bisect_left(keepable, n - d)
            att_peak = 0
            for ah in range(hi - lo + 1):
                if ah:
                    att_peak = max(att_peak, window * costs[keepable[lo + ah - 1]].attention_bytes)
                moved = head + att[lo + ah] - att[lo]
                room = dev_room - tail - graph_peak - att_peak
                if moved > host_room or room < 0:
                    continue
                start = lo + ah  # the most device attention keeps that fit in the room left
                ad = max(bisect.bisect_right(att, att[start] + room, start, hi + 1) - 1 - start, 0)
                bwd = bwd_all - skipped - (att_s[start + ad] - att_s[lo])
                step = _estimate(fwd_compute, bwd, moved, link, bounds).step_s
                held = tail + graph_peak + att_peak + att[start + ad] - att[start]
                yield (step, moved, held), _Split(n, d, h, ad, ah)


def _prefix(values: Iterable[float]) -> list:
    return list(itertools.accumulate(values, initial=0))


def _count(blocks: list[int]) -> str:
    return f"{len(blocks)} block" + ("s" if len(blocks) != 1 else "")


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)
