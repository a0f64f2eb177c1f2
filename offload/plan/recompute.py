"""Recompute or offload, per block: the choice that minimises the estimated step time (SSDTrain).

Recomputing a block in backward costs its forward compute again (about a third of its forward
plus backward). Offloading its saved tensors instead costs moving them to host memory during
forward and back during backward, which overlaps compute up to the host link's capacity, while
weight uploads, gradient copies and boundary states use the same link. This module is the cost
model and the choice, pure arithmetic: the runtime feeds it measured figures
(``placement.offload_saved: auto``), ``offload plan`` feeds it estimates.

The model of one step, per phase, is the slowest of its compute and its two link directions:

    forward  = max(sum F,                 H2D_fwd / h2d,             (D2H_fwd + sum_off S) / d2h)
    backward = max(sum B + sum_rec F,     (H2D_bwd + sum_off S) / h2d,  D2H_bwd / d2h)

with F a block's forward time, B its backward without recompute, S its saved bytes, and the
H2D/D2H terms the link's other traffic. Blocks are taken in order of compute saved per byte
moved (F / S, best first; on a tie the earlier block, whose copy out has the rest of the forward
to hide behind and whose copy back the rest of the backward), and the best prefix wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockCost:
    """What one block costs each way."""

    forward_s: float
    """One forward of the block: what recomputing it costs."""
    backward_s: float
    """Its backward, without the recompute."""
    saved_bytes: int
    """Bytes its saved tensors move each way when offloaded (weights excluded, storages once)."""


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

    def __post_init__(self) -> None:
        if not (self.h2d_bytes_s > 0 and self.d2h_bytes_s > 0):
            raise ValueError(f"link rates must be > 0 bytes/s, got {self.h2d_bytes_s}, {self.d2h_bytes_s}")


@dataclass(frozen=True, slots=True)
class Choice:
    """Which blocks offload, and the step times the model predicts."""

    offload: tuple[bool, ...]
    step_s: float
    """Estimated step time with this choice."""
    recompute_step_s: float
    """Estimated step time recomputing every block."""
    offloaded_bytes: int
    """Host bytes the offloaded blocks' saved tensors take."""

    @property
    def blocks(self) -> list[int]:
        return [i for i, off in enumerate(self.offload) if off]

    def describe(self) -> str:
        """One line: which blocks offload and the estimated gain."""
        chosen = self.blocks
        if not chosen:
            return f"recompute every block (est. step {self.recompute_step_s:.3f} s)"
        gain = 1 - self.step_s / self.recompute_step_s if self.recompute_step_s > 0 else 0.0
        return (
            f"offload blocks {_ranges(chosen)}, recompute the other {len(self.offload) - len(chosen)} "
            f"(est. step {self.step_s:.3f} s against {self.recompute_step_s:.3f} s, {gain:.0%} faster)"
        )


def step_time(costs: Sequence[BlockCost], link: Link, offload: Sequence[bool]) -> float:
    """The model's step time (seconds) when the blocks flagged in offload keep their saved tensors."""
    moved = sum(c.saved_bytes for c, off in zip(costs, offload) if off)
    recomputed = sum(c.forward_s for c, off in zip(costs, offload) if not off)
    forward = max(
        sum(c.forward_s for c in costs),
        link.h2d_forward / link.h2d_bytes_s,
        (link.d2h_forward + moved) / link.d2h_bytes_s,
    )
    backward = max(
        sum(c.backward_s for c in costs) + recomputed,
        (link.h2d_backward + moved) / link.h2d_bytes_s,
        link.d2h_backward / link.d2h_bytes_s,
    )
    return forward + backward


def choose(costs: Sequence[BlockCost], link: Link, host_bytes: int | None = None) -> Choice:
    """The blocks whose offload minimises the step time; their saved bytes stay within
    host_bytes (None: no limit). Ties go to fewer bytes moved."""
    order = sorted(range(len(costs)), key=lambda i: (-_per_byte(costs[i]), i))
    flags = [False] * len(costs)
    best = list(flags)
    recompute = best_s = step_time(costs, link, flags)
    used = 0
    for i in order:
        used += costs[i].saved_bytes
        if host_bytes is not None and used > host_bytes:
            break
        flags[i] = True
        t = step_time(costs, link, flags)
        if t < best_s:
            best, best_s = list(flags), t
    moved = sum(c.saved_bytes for c, off in zip(costs, best) if off)
    return Choice(tuple(best), best_s, recompute, moved)


def _per_byte(c: BlockCost) -> float:
    return c.forward_s / c.saved_bytes if c.saved_bytes > 0 else float("inf")


def _ranges(indices: list[int]) -> str:
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
