"""Memory tiers of the store's optimizer state (``placement.optimizer_state``).

One implementation per tier behind the StateTier interface; ``make_state_tier`` is the one place
that maps the configured Tier to its implementation.
"""

from __future__ import annotations

from offload.config import Config, Tier
from offload.store.tiers.base import HostTier, StateTier
from offload.store.tiers.cxl import CxlTier
from offload.store.tiers.nvme import NvmeTier


def make_state_tier(cfg: Config, numel: int) -> StateTier:
    """The tier of the streamed blocks' Adam state; numel: elements of the largest block.

    host, cxl and nvme are built; auto and gpu keep the state in host memory, as before (the
    planner does not drive the runtime yet)."""
    if cfg.placement.optimizer_state is Tier.NVME:
        return NvmeTier(cfg.nvme_dirs, numel)
    if cfg.placement.optimizer_state is Tier.CXL:
        return CxlTier(cfg.cxl_nodes)
    return HostTier()


__all__ = ["CxlTier", "HostTier", "NvmeTier", "StateTier", "make_state_tier"]
