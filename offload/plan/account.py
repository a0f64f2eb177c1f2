"""Accounting: what a run really holds, figure by figure, against what its plan predicted.

Issue 4 asks that the ledger's measured peak and the process's peak RSS stay within 5% of the
plan, and that every run's summary shows plan against measured. :func:`account` reads the
figures off a live runtime (``model.runtime``) after some steps:

- **pinned**: the store's pinned pool, its ledger's peak in use, against ``Plan.pinned_bytes``.
  Both count each buffer's page-rounded arena, so they are equal, not close.
- **host store**: ``BlockRecord.state_bytes`` over the records in host RAM, against the plan's
  store rows and gradient sums on the host (equal as well, once the run has accumulated if its
  plan has grad_accum > 1).
- **nvme state** / **cxl state**: ``Runtime.stored_bytes(tier)`` (the spill tiers' files and
  CXL memory: m, v, masters, gradient sums) against the plan's store rows and gradient sums
  there (activations on nvme are not in it).
- **host peak RSS**: the process's peak resident set (``getrusage``) against the plan's host need
  for one rank. The plan's overhead is a fixed guess (``HOST_OVERHEAD_BYTES``), so this is the
  figure that can drift; on the CPU it includes the gpu column, as the plan does.
- **gpu peak**: ``torch.cuda.max_memory_allocated`` against the plan's gpu need (CUDA only).
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from offload.config import Tier
from offload.plan.plan import GiB, Plan

if TYPE_CHECKING:
    from offload.engine.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Figure:
    """One quantity, predicted by the plan and measured on the run, in bytes."""

    name: str
    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        """measured / predicted (nan when the plan predicted nothing)."""
        return self.measured / self.predicted if self.predicted else math.nan


@dataclass(frozen=True, slots=True)
class Accounting:
    figures: tuple[Figure, ...]

    def get(self, name: str) -> Figure:
        for f in self.figures:
            if f.name == name:
                return f
        raise KeyError(f"no figure {name!r}; there are {[f.name for f in self.figures]}")

    def line(self) -> str:
        """One line for a run's summary: measured / predicted GiB (ratio) per figure."""
        parts = [
            f"{f.name} {f.measured / GiB:.2f}/{f.predicted / GiB:.2f} GiB ({f.ratio:.3f})"
            for f in self.figures
        ]
        return "plan vs measured (measured/predicted): " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: {
                "predicted": f.predicted,
                "measured": f.measured,
                "ratio": None if math.isnan(f.ratio) else f.ratio,
            }
            for f in self.figures
        }


def account(plan: Plan, runtime: Runtime) -> Accounting:
    """The figures of the module docstring for runtime, which was built from plan."""
    records = runtime.records()
    figures = [
        Figure("pinned", plan.pinned_bytes, runtime.pool.stats().peak_in_use),
        Figure(
            "host store",
            _store(plan, Tier.HOST),
            sum(r.state_bytes() for r in records if not r.on_device),
        ),
    ]
    for tier in (Tier.NVME, Tier.CXL):
        if _store(plan, tier):
            figures.append(Figure(f"{tier} state", _store(plan, tier), runtime.stored_bytes(tier)))
    figures.append(Figure("host peak RSS", plan.needed[Tier.HOST] // plan.local_ranks, peak_rss()))
    if runtime.device.cuda:
        peak = torch.cuda.max_memory_allocated(runtime.device.torch)
        figures.append(Figure("gpu peak", plan.needed[Tier.GPU], peak))
    return Accounting(tuple(figures))


def _store(plan: Plan, tier: Tier) -> int:
    """The plan's store rows on tier and the gradient sums there (made by the first accumulation,
    so a run that accumulates holds them by the time it is accounted)."""
    return plan.store_bytes(tier) + plan.get("grad_accum", tier)


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["Accounting", "Figure", "account", "peak_rss"]
