"""The CXL tiers (offload/store/tiers/cxl.py, cxl_master.py, grad_sums.py) on any machine: node 0
stands in for a CXL node. Training with Adam's m and v, the fp32 masters or the gradient sums in
node-bound pool memory must match host placement bitwise (the same kernels on the same numbers,
only the memory holding them differs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import offload
from offload.config import ConfigError, Tier
from offload.memory.arena import Lease
from offload.memory.numa import MPOL_BIND, SYSFS_NODES, verify_binding
from offload.store.tiers import CxlGradSums, CxlMasterTier, CxlTier, HostTier, NvmeTier
from tests.models import tiny
from tests.test_checkpoint import resumed  # 3 steps, save, load into a new wrap, 3 steps
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


def _bound_to_node_0(lease: Lease) -> None:
    report = verify_binding(lease)
    assert report.ok, str(report)
    assert report.mode == MPOL_BIND and report.policy_nodes == (0,)


@needs_numa
@pytest.mark.parametrize("nodes", [[0], [0, 0]])
def test_masters_on_cxl_train_bitwise_like_host(nodes: list[int]) -> None:
    """placement.master cxl: each streamed block's fp32 master in a node-bound lease, its m and
    v still in the record; the wire copy and the gradient stay in the local pinned pool."""
    host, host_losses, host_state = train("bfloat16")
    cxl, losses, state = train("bfloat16", placement={"master": "cxl"}, cxl_nodes=nodes)
    assert losses == host_losses  # bitwise
    for key, value in host_state.items():
        assert torch.equal(state[key], value), key

    tier = cxl.runtime.state_tier
    assert isinstance(tier, CxlMasterTier) and isinstance(tier.state, HostTier)
    for rec, ref in zip(cxl.runtime.blocks, host.runtime.blocks):
        assert rec.master_on_tier and rec.exp_avg is not None
        master, m, v = tier.acquire(rec)
        assert torch.equal(master, ref.master) and torch.equal(m, ref.exp_avg)
        assert torch.equal(v, ref.exp_avg_sq)
        tier.release(rec)
        _bound_to_node_0(tier.lease(rec))
        assert rec.state_bytes() == ref.state_bytes() - 4 * rec.numel  # the master left the record
        assert rec.wire.data_ptr() != master.data_ptr()  # the device reads the local wire copy
    assert (
        tier.stored_bytes()
        == tier.stored_bytes(Tier.CXL)
        == sum(_page(4 * r.numel) for r in cxl.runtime.blocks)
    )
    assert tier.stored_bytes(Tier.NVME) == 0
    cxl.runtime.close()
    host.runtime.close()
    assert tier.stored_bytes() == 0


ACCUMULATING: dict[str, dict[str, Any]] = {
    "gradients-cxl": {"placement": {"gradients": "cxl"}, "cxl_nodes": [0]},
    "gradients-cxl-optimizer-nvme": {"placement": {"gradients": "cxl", "optimizer_state": "nvme"}},
    "master-and-gradients-cxl-optimizer-nvme": {
        "placement": {"gradients": "cxl", "master": "cxl", "optimizer_state": "nvme"}
    },
    "partial-spill-all-cxl": {
        "placement": {"gradients": "cxl", "master": "cxl", "optimizer_state": "cxl", "spill_blocks": 2},
        "cxl_nodes": [0, 0],
    },
    "partial-spill-master-nvme-gradients-cxl": {
        "placement": {"gradients": "cxl", "master": "nvme", "optimizer_state": "nvme", "spill_blocks": 3}
    },
}


@needs_numa
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_sums_on_cxl_train_bitwise_like_host(disk_dir: Path, dtype: str) -> None:
    """placement.gradients cxl with 2 micro-batches a step: the spilled blocks' fp32 sums in
    node-bound leases (alone, and with m, v on nvme or cxl and masters on cxl or nvme), the
    same losses and weights bit for bit as all on the host, accumulating as well."""
    host, ref_losses, ref_state = train(dtype, accum=2)
    for name, extra in ACCUMULATING.items():
        if "master" in extra["placement"] and dtype == "float32":
            continue  # in float32 the master is the pinned copy the device reads: refused
        extra = {"cxl_nodes": [0], "nvme_dirs": [str(disk_dir)], **extra}
        wrapped, losses, state = train(dtype, accum=2, **extra)
        assert losses == ref_losses, name  # bitwise
        for key, value in ref_state.items():
            assert torch.equal(state[key], value), (name, key)
        rt = wrapped.runtime
        sums = rt.grad_sums
        assert isinstance(sums, CxlGradSums), name
        k = extra["placement"].get("spill_blocks", 4)
        assert rt.spilled == range(4 - k, 4), name
        for rec, ref in zip(rt.blocks, host.runtime.blocks):
            assert ref.grad_acc is not None and rec.grad_acc is not None
            assert torch.equal(rec.grad_acc, ref.grad_acc), (name, rec.name)  # the last step's sum
            if rec.index in rt.spilled:
                assert rec.grad_acc_tier is sums and rec.grad_acc.data_ptr() == sums.lease(rec).ptr
                _bound_to_node_0(sums.lease(rec))
            else:
                assert rec.grad_acc_tier is None
        assert sums.stored_bytes(Tier.CXL) == k * _page(4 * rt.blocks[0].numel), name
        if extra["placement"].get("optimizer_state") == "nvme":
            assert isinstance(_state_tier(rt.state_tier), NvmeTier), name
        rt.close()
        assert all(r.grad_acc is None for r in rt.blocks if r.index in rt.spilled)  # unmapped
    host.runtime.close()


def _state_tier(tier: Any) -> Any:
    """The tier of m and v (under a CxlMasterTier, when masters are on cxl)."""
    return tier.state if isinstance(tier, CxlMasterTier) else tier


@needs_numa
def test_masters_on_cxl_resume_and_load_on_host(tmp_path: Path) -> None:
    """Two of four blocks keep their masters on cxl: a checkpoint reads them through the tier,
    resumes bitwise, and loads into host placement (and back)."""
    cxl = {"dtype": "bfloat16", "placement": {"master": "cxl", "spill_blocks": 2}, "cxl_nodes": [0]}
    resumed(tmp_path / "a", cxl, cxl)
    resumed(tmp_path / "b", cxl, {"dtype": "bfloat16"})
    resumed(tmp_path / "c", {"dtype": "bfloat16"}, cxl)


@needs_numa
def test_a_missing_node_for_masters_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"cxl_nodes\[1\] = 999: NUMA node 999 does not exist"):
        offload.wrap(
            tiny("llama", layers=2),
            device="cpu",
            dtype="bfloat16",
            placement={"master": "cxl", "gradients": "cxl"},
            cxl_nodes=[0, 999],
        )


@pytest.mark.parametrize(
    ("placement", "field"),
    [({"master": "cxl"}, "placement.master"), ({"gradients": "cxl"}, "placement.gradients")],
)
def test_master_or_gradients_on_cxl_need_a_node(placement: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        offload.wrap(tiny("llama", layers=2), device="cpu", dtype="bfloat16", placement=placement)
    assert str(e.value).startswith(
        f"cxl_nodes = []: placement uses the cxl tier ({field}): name a NUMA node of CXL memory"
    ), str(e.value)


def test_master_on_cxl_is_refused_in_float32() -> None:
    with pytest.raises(ConfigError) as e:
        offload.wrap(
            tiny("llama", layers=2), device="cpu", dtype="float32", placement={"master": "cxl"}, cxl_nodes=[0]
        )
    assert str(e.value).startswith(
        "placement.master = 'cxl': in float32 the master is itself the pinned copy the device reads"
    ), str(e.value)


def test_gradient_sums_on_nvme_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        offload.wrap(
            tiny("llama", layers=2), device="cpu", placement={"gradients": "nvme"}, nvme_dirs=["/tmp"]
        )
    assert str(e.value).startswith(
        "placement.gradients = 'nvme': a gradient sum on nvme would be read and written back once "
        "per micro-batch, on backward's critical path"
    ), str(e.value)
    assert "use gradients cxl or host" in str(e.value)


@needs_numa
def test_auto_spill_to_cxl_is_followed_and_trains_like_host() -> None:
    """optimizer_state auto with cxl_nodes: the plan's fewest blocks to cxl, the runtime's CxlTier
    for exactly those, and training bitwise as with everything on the host."""
    from offload.config import load_config
    from offload.plan import make_plan

    base = {"device": "cpu", "dtype": "float32", "cxl_nodes": [0]}

    def need(k: int) -> int:
        cfg = load_config(None, **base, placement={"optimizer_state": "cxl", "spill_blocks": k})
        return make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16).needed[Tier.HOST]

    cfg = load_config(None, **base, placement={"optimizer_state": "auto"}, budgets={"host_bytes": need(5)})
    plan = make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16)
    assert plan.placement["optimizer_state"] is Tier.CXL and plan.spill_blocks == 5 and need(4) > need(5)
    host, host_losses, host_state = train("float32", layers=8)
    auto = {"placement": {"optimizer_state": "auto"}, "cxl_nodes": [0], "budgets": {"host_bytes": need(5)}}
    cxl, losses, state = train("float32", layers=8, plan=plan, **auto)
    assert cxl.runtime.spilled == range(3, 8) and isinstance(cxl.runtime.state_tier, CxlTier)
    assert plan.store_bytes(Tier.CXL) == cxl.runtime.state_tier.stored_bytes()
    assert losses == host_losses
    for key, value in host_state.items():
        assert torch.equal(state[key], value), key
    cxl.runtime.close()
    host.runtime.close()


@needs_numa
def test_auto_gradient_sums_to_cxl_are_followed_and_train_like_host() -> None:
    """optimizer_state, master and gradients auto with cxl_nodes and 2 micro-batches a step, the
    host budget one byte short of every streamed block's m, v and master on cxl: the plan puts the
    fewest blocks' gradient sums there too, the runtime's CxlGradSums holds exactly those, and
    training is bitwise as with everything on the host."""
    from offload.config import load_config
    from offload.plan import make_plan

    base = {"device": "cpu", "dtype": "bfloat16", "cxl_nodes": [0]}

    def plan_of(placement: dict, host_bytes: int | None = None) -> Any:
        cfg = load_config(None, **base, placement=placement, budgets={"host_bytes": host_bytes})
        return make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16, grad_accum=2)

    spilled = {"optimizer_state": "cxl", "master": "cxl", "spill_blocks": 8}
    budget = plan_of(spilled).needed[Tier.HOST] - 1
    placement = {"optimizer_state": "auto", "master": "auto", "gradients": "auto"}
    plan = plan_of(placement, budget)
    k = plan.spill_blocks
    assert plan.fits and plan.placement["gradients"] is Tier.CXL and k is not None and 0 < k <= 8
    host, host_losses, host_state = train("bfloat16", accum=2, layers=8)
    auto = {"placement": placement, "cxl_nodes": [0], "budgets": {"host_bytes": budget}}
    cxl, losses, state = train("bfloat16", accum=2, layers=8, plan=plan, **auto)
    rt = cxl.runtime
    assert rt.spilled == range(8 - k, 8) and isinstance(rt.grad_sums, CxlGradSums)
    assert isinstance(rt.state_tier, CxlMasterTier) and isinstance(rt.state_tier.state, CxlTier)
    assert plan.get("grad_accum", Tier.CXL) == rt.grad_sums.stored_bytes(Tier.CXL)
    assert losses == host_losses
    for key, value in host_state.items():
        assert torch.equal(state[key], value), key
    rt.close()
    host.runtime.close()
