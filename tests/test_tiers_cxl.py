"""The CXL optimizer-state tier (offload/store/tiers/cxl.py) on any machine: node 0 stands in for
a CXL node. Training with Adam's m and v in node-bound pool memory must match host placement
bitwise (the same kernels on the same numbers, only the memory holding m and v differs)."""

from __future__ import annotations

import pytest
import torch

import offload
from offload.config import ConfigError
from offload.memory.numa import MPOL_BIND, SYSFS_NODES, verify_binding
from offload.store.tiers import CxlTier
from tests.models import tiny
from tests.test_tiers import train  # the same run as the NVMe tier's tests

STEPS = 4
PAGE = 4096

needs_numa = pytest.mark.skipif(not (SYSFS_NODES / "node0").is_dir(), reason="kernel exposes no NUMA nodes")


def _page(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


@needs_numa
@pytest.mark.parametrize(("dtype", "nodes"), [("float32", [0]), ("bfloat16", [0]), ("float32", [0, 0])])
def test_cxl_state_trains_bitwise_like_host(dtype: str, nodes: list[int]) -> None:
    host, host_losses, host_state = train(dtype)
    cxl, losses, state = train(dtype, placement={"optimizer_state": "cxl"}, cxl_nodes=nodes)
    assert losses == host_losses  # bitwise
    for key, value in host_state.items():
        assert torch.equal(state[key], value), key

    tier = cxl.runtime.state_tier
    assert isinstance(tier, CxlTier)
    refs = host.runtime.blocks
    for k, (rec, ref) in enumerate(zip(cxl.runtime.blocks, refs)):
        assert tier.stripe_of(rec) == k % len(nodes)  # round-robin, block by block
        _, m, v = tier.acquire(rec)
        assert torch.equal(m, ref.exp_avg) and torch.equal(v, ref.exp_avg_sq)
        tier.release(rec)
        for lease in tier.leases(rec):
            report = verify_binding(lease)
            assert report.ok, str(report)
            assert report.mode == MPOL_BIND and report.policy_nodes == (0,)
        # m and v are off the record: its own memory is the host record's less 8 bytes a weight
        assert rec.exp_avg is None and rec.exp_avg_sq is None
        assert rec.state_bytes() == ref.state_bytes() - 8 * rec.numel
    # The residents' m and v stay in the record (HostTier), as with host placement.
    assert cxl.runtime.resident is not None and cxl.runtime.resident.exp_avg is not None
    assert tier.stored_bytes() == sum(2 * _page(4 * r.numel) for r in cxl.runtime.blocks)
    cxl.runtime.close()
    host.runtime.close()
    assert tier.stored_bytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        tier.acquire(cxl.runtime.blocks[0])


@needs_numa
def test_missing_node_names_the_field() -> None:
    with pytest.raises(
        ConfigError, match=r"cxl_nodes\[1\] = 999: NUMA node 999 does not exist; nodes on this"
    ):
        offload.wrap(
            tiny("llama", layers=2), device="cpu", placement={"optimizer_state": "cxl"}, cxl_nodes=[0, 999]
        )


def test_cxl_placement_needs_a_node() -> None:
    with pytest.raises(ConfigError, match=r"cxl_nodes = \[\]: placement uses the cxl tier"):
        offload.wrap(tiny("llama", layers=2), device="cpu", placement={"optimizer_state": "cxl"})
