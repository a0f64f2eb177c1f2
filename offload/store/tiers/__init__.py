"""Memory tiers of the store's spilled state (``placement.optimizer_state``, ``placement.master``).

One implementation per tier behind the StateTier interface; ``make_state_tier`` is the one place
that maps the configured Tier to its implementation.
"""

from __future__ import annotations

from offload.config import Config, Tier
from offload.store.tiers.base import Held, HostTier, StateTier
from offload.store.tiers.cxl import CxlTier
from offload.store.tiers.nvme import NvmeTier


def make_state_tier(tier: Tier, cfg: Config, numel: int, *, master: bool = False) -> StateTier:
    """The implementation of tier for the spilled blocks' state; numel: elements of the largest
    block. master: the tier holds the blocks' fp32 masters too (nvme only)."""
    if tier is Tier.NVME:
        return NvmeTier(cfg.nvme_dirs, numel, master=master)
    if tier is Tier.CXL:
        return CxlTier(cfg.cxl_nodes)
    if tier is Tier.HOST:
        return HostTier()
    raise ValueError(f"no state tier for {tier}")


__all__ = ["CxlTier", "Held", "HostTier", "NvmeTier", "StateTier", "make_state_tier"]
