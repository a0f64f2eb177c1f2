"""Memory tiers of the store's spilled state (``placement.optimizer_state``, ``placement.master``,
``placement.gradients``).

One implementation per tier behind the StateTier interface (m, v and the master) and the
GradSumTier interface (gradient sums); ``make_state_tier`` and ``make_grad_sums`` are the one
place that maps the configured Tier to its implementation.
"""

from __future__ import annotations

from offload.config import Config, Tier
from offload.store.tiers.base import Held, HostTier, StateTier
from offload.store.tiers.cxl import CxlMemory, CxlTier
from offload.store.tiers.cxl_master import CxlMasterTier
from offload.store.tiers.grad_sums import CxlGradSums, GradSumTier
from offload.store.tiers.nvme import NvmeTier


def make_state_tier(optimizer: Tier, master: Tier, cfg: Config, numel: int) -> StateTier:
    """The tier of the spilled blocks' state: their m and v on optimizer (host, cxl, nvme), their
    masters on master (host; nvme, in the files of m and v; cxl, wrapping the tier of m and v).
    numel: elements of the largest block."""
    if optimizer is Tier.NVME:
        state: StateTier = NvmeTier(cfg.nvme_dirs, numel, master=master is Tier.NVME)
    elif optimizer is Tier.CXL:
        state = CxlTier(cfg.cxl_nodes)
    elif optimizer is Tier.HOST:
        state = HostTier()
    else:
        raise ValueError(f"no state tier for optimizer_state {optimizer}")
    if master is Tier.CXL:
        try:
            return CxlMasterTier(cfg.cxl_nodes, state)
        except BaseException:
            state.close()  # no files left behind
            raise
    return state


def make_grad_sums(gradients: Tier, cfg: Config) -> GradSumTier | None:
    """The tier of the spilled blocks' gradient sums; None: next to their gradients (host), or
    on the compute device (gpu: the executor keeps them, BlockRecord.dev_sum)."""
    if gradients is Tier.CXL:
        return CxlGradSums(cfg.cxl_nodes)
    if gradients in (Tier.HOST, Tier.GPU):
        return None
    raise ValueError(f"no gradient-sum tier for {gradients}")


__all__ = [
    "CxlGradSums",
    "CxlMasterTier",
    "CxlMemory",
    "CxlTier",
    "GradSumTier",
    "Held",
    "HostTier",
    "NvmeTier",
    "StateTier",
    "make_grad_sums",
    "make_state_tier",
]
