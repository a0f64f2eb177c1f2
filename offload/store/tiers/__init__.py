"""Memory tiers of the store's optimizer state (``placement.optimizer_state``).

One implementation per tier behind the StateTier interface; ``make_state_tier`` is the one place
that maps the configured Tier to its implementation.
"""

from __future__ import annotations

from offload.config import Config, Tier
from offload.store.tiers.base import HostTier, StateTier
from offload.store.tiers.nvme import NvmeTier


def make_state_tier(cfg: Config, numel: int) -> StateTier:
    """The tier of the streamed blocks' Adam state; numel: elements of the largest block.

    Only host and nvme are built; auto, gpu and cxl keep the state in host memory, as before
    (the planner and the CXL tier are later work)."""
    if cfg.placement.optimizer_state is Tier.NVME:
        return NvmeTier(cfg.nvme_dirs, numel)
    return HostTier()


__all__ = ["HostTier", "NvmeTier", "StateTier", "make_state_tier"]
