"""The planner's activations (offload/plan/activations.py, tally's activation rows): bytes per
placement, the saved bytes counted on the meta device against what the runtime moves, and the
recompute-or-offload choice shown by ``offload plan``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import offload
from offload.cli.main import main
from offload.config import Tier, load_config
from offload.plan import make_plan
from offload.plan.activations import count_block, forward_flops, reserved_for, saved_bytes_per_block
from offload.plan.measure import Rates, measure_disk
from offload.plan.planner import DEVICE_MARGIN_BYTES
from offload.plan.recompute import SAVED_HELD, Keep
from offload.plan.tally import ACTIVATION_STAGING, ACTIVATION_WINDOW
from tests.models import Stack, batches, run_steps, tiny

FAST = Rates(h2d_bytes_s=1e15, d2h_bytes_s=1e15, flops=1e9)  # the link is never the bottleneck
SLOW = Rates(h2d_bytes_s=1.0, d2h_bytes_s=1.0, flops=1e15)  # the link always is


def plan(placement: dict, rates: Rates | None = FAST, budgets: dict | None = None, **kw):
    cfg = load_config(
        device="cpu",
        dtype="float32",
        placement=placement,
        nvme_dirs=["/tmp/x"],
        cxl_nodes=[0],
        budgets=budgets or {},
    )
    return make_plan(tiny("llama", layers=4), cfg, batch_size=2, seq_len=16, rates=rates, **kw)


PER_BLOCK = 2 * 16 * 48 * 4  # batch x seq x hidden x float32


def test_boundary_states_follow_the_placement() -> None:
    gpu, host, nvme = (plan({"activations": t}) for t in ("gpu", "host", "nvme"))
    assert gpu.get("activations", Tier.GPU) == 4 * PER_BLOCK
    assert host.get("activations", Tier.HOST) == 4 * PER_BLOCK
    assert host.get("activations", Tier.GPU) == min(4, ACTIVATION_WINDOW) * PER_BLOCK
    padded = -(-PER_BLOCK // 4096) * 4096  # each group padded to O_DIRECT's alignment
    assert nvme.get("activations", Tier.NVME) == 4 * padded
    assert nvme.get("activation_staging", Tier.HOST) == min(4, ACTIVATION_STAGING) * padded
    assert (host.placement["activations"], nvme.placement["activations"]) == (Tier.HOST, Tier.NVME)


def eight(placement: dict, budgets: dict | None = None):  # type: ignore[no-untyped-def]
    """A plan of an 8-block model: more blocks than the window host placement keeps on the device."""
    cfg = load_config(
        device="cpu", dtype="float32", placement=placement, nvme_dirs=["/tmp/x"], budgets=budgets or {}
    )
    return make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16, rates=FAST)


def test_activations_auto_takes_the_fastest_tier_that_fits() -> None:
    """auto: on the device when the boundary states fit its budget beside the rest, else in host
    memory (the device keeps a window), else on nvme; cxl is not built and stays on the device."""
    auto, cxl = plan({"activations": "auto"}), plan({"activations": "cxl"})
    assert auto.placement["activations"] is Tier.GPU and cxl.placement["activations"] is Tier.GPU
    assert any("activations auto: gpu (they fit the gpu budget)" in n for n in auto.notes)
    assert any("activations cxl is not built" in n for n in cxl.notes)
    on_gpu, on_host = eight({"activations": "gpu"}).needed, eight({"activations": "host"}).needed
    assert on_host[Tier.GPU] < on_gpu[Tier.GPU]
    tight = {"gpu_bytes": on_gpu[Tier.GPU] - 1}  # the window fits, all of them do not
    host = eight({"activations": "auto"}, tight)
    assert host.placement["activations"] is Tier.HOST and host.fits and host.needed == on_host
    assert any("activations auto: host (they do not fit the gpu budget" in n for n in host.notes)
    nvme = eight({"activations": "auto"}, {**tight, "host_bytes": on_host[Tier.HOST] - 1})
    assert nvme.placement["activations"] is Tier.NVME and nvme.fits
    assert any("activations auto: nvme (they fit neither" in n for n in nvme.notes)
    neither = eight({"activations": "auto"}, {"gpu_bytes": on_host[Tier.GPU] - 1})
    assert neither.placement["activations"] is Tier.GPU and not neither.fits


def test_the_runtime_follows_the_plans_boundary_tier() -> None:
    """activations auto at run time: the store the plan chose, and the same training."""
    from offload.engine.activations import DeviceStore, HostStore

    cfg = load_config(device="cpu", dtype="float32", placement={"activations": "auto"})
    on_gpu = make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16).needed[Tier.GPU]
    losses = {}
    for kind, c in ((DeviceStore, cfg), (HostStore, load_config(cfg, budgets={"gpu_bytes": on_gpu - 1}))):
        model = tiny("llama", layers=8)
        wrapped, opt = offload.wrap(model, c, plan=make_plan(model, c, batch_size=2, seq_len=16))
        assert type(wrapped.runtime.activations.boundary) is kind
        losses[kind] = run_steps(wrapped, opt, 2, 1, lambda step, _: batches(2)[step])
        wrapped.runtime.close()
    assert losses[DeviceStore] == losses[HostStore]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_bytes_counted_on_meta_are_what_the_runtime_moves(family: str) -> None:
    counted = saved_bytes_per_block(tiny(family, layers=2), "float32", 2, 16)
    model, _ = offload.wrap(
        tiny(family, layers=2), device="cpu", dtype="float32", placement={"offload_saved": "always"}
    )
    ids = batches(1)[0]
    loss = model(input_ids=ids, labels=ids).loss
    store = model.runtime.activations.saved.store
    # Both blocks' groups are in host memory now, but for the second block's rotary tables
    # (cos and sin: batch 1 x 16 x head dim 12, float32), shared with the first and kept.
    shared = 2 * 16 * 12 * 4 if family == "llama" else 0
    assert store.stored_bytes() == 2 * counted - shared
    loss.backward()
    model.runtime.close()


def gpu_room(placement: dict, room: int, rates: Rates = FAST):
    """A plan whose gpu budget leaves room bytes for kept tensors beyond its other needs, the
    allocator's slack over them (what the runtime's room is measured from) and the margin."""
    need = plan({}, rates).needed[Tier.GPU]
    return plan(placement, rates, budgets={"gpu_bytes": reserved_for(need) + DEVICE_MARGIN_BYTES + room})


def test_auto_keeps_every_graph_on_the_device_when_it_has_room() -> None:
    p = plan({"offload_saved": "auto"})  # no gpu budget: unbounded
    saved = saved_bytes_per_block(tiny("llama", layers=4), "float32", 2, 16)
    assert p.recompute is not None and p.recompute.keep == (Keep.DEVICE,) * 4
    assert p.get("saved", Tier.GPU) == 4 * saved and p.get("saved", Tier.HOST) == 0
    assert "offload_saved: keep on the device 4 blocks: 0-3 (est. step" in p.table()
    assert p.to_json()["offload_saved"]["device"] == [0, 1, 2, 3]


def test_auto_offloads_to_host_when_the_device_is_full() -> None:
    """Room for the window of host groups (and the allocator's one more) and no more: every graph
    goes to host memory, and the gpu row counts them."""
    saved = saved_bytes_per_block(tiny("llama", layers=4), "float32", 2, 16)
    p = gpu_room({"offload_saved": "auto"}, SAVED_HELD * saved + saved // 2)
    assert p.recompute is not None and p.recompute.keep == (Keep.HOST,) * 4
    assert p.get("saved", Tier.HOST) == 4 * saved
    assert p.get("saved", Tier.GPU) == SAVED_HELD * saved
    assert p.fits
    assert "offload_saved: offload to host 4 blocks: 0-3 (est." in p.table()
    assert p.to_json()["offload_saved"]["blocks"] == [0, 1, 2, 3]


def test_auto_recomputes_on_a_slow_link_with_no_device_room() -> None:
    p = gpu_room({"offload_saved": "auto"}, 0, rates=SLOW)
    assert p.recompute is not None and not any(p.recompute.offload)
    assert p.get("saved", Tier.HOST) == p.get("saved", Tier.GPU) == 0
    assert "offload_saved: recompute every block" in p.table()


def test_auto_device_blocks_give_way_to_keeps_that_pay() -> None:
    """A gpu budget that every block's state fills to its margin: kept graphs pay more than
    device blocks (the link and the CPU are free here), so device_blocks auto takes fewer."""
    whole = plan({"device_blocks": 4}).needed[Tier.GPU]
    budgets = {"gpu_bytes": whole + DEVICE_MARGIN_BYTES}
    alone = plan({"device_blocks": "auto"}, budgets=budgets)
    assert alone.device_blocks == 4  # without offload_saved nothing competes for the memory
    fixed = plan({"device_blocks": 4, "offload_saved": "auto"}, budgets=budgets)
    assert fixed.recompute is not None and not any(fixed.recompute.offload)
    p = plan({"device_blocks": "auto", "offload_saved": "auto"}, budgets=budgets)
    assert p.recompute is not None and p.device_blocks < 4 and any(p.recompute.offload)
    assert p.recompute.step_s < fixed.recompute.step_s and p.fits
    assert any(f"device_blocks auto: {p.device_blocks} rather than 4" in n for n in p.notes)


def test_a_cpu_bound_plan_keeps_nothing_and_says_why() -> None:
    """With the CPU optimizer at 1 parameter a second, the step is its updates: nothing pays."""
    slow_cpu = dataclasses.replace(FAST, adam_params_s=1.0)
    p = plan({"offload_saved": "auto"}, slow_cpu)
    assert p.recompute is not None and p.recompute.keep == (Keep.RECOMPUTE,) * 4
    assert p.recompute.bound == "the CPU optimizer"
    assert "under the 10% threshold; the CPU optimizer's" in p.table()
    assert p.get("saved", Tier.GPU) == 0


def test_a_fixed_list_is_shown_with_its_estimate() -> None:
    p = plan({"offload_saved": [1, 2]}, rates=SLOW)
    assert p.recompute is not None and p.recompute.blocks == [1, 2]
    assert p.recompute.keep[1] is Keep.HOST
    assert p.recompute.step_s > p.recompute.recompute_step_s  # on this link it costs time


def test_a_mapping_is_shown_with_its_estimate() -> None:
    counted = count_block(tiny("llama", layers=4), "float32", 2, 16)
    p = plan({"offload_saved": {"device": [3], "attention": [0, 1], "attention_host": [2]}})
    assert p.recompute is not None
    assert p.recompute.keep == (Keep.ATTENTION, Keep.ATTENTION, Keep.ATTENTION_HOST, Keep.DEVICE)
    assert p.get("saved", Tier.HOST) == counted.attention
    assert p.get("saved", Tier.GPU) == counted.saved + (2 + SAVED_HELD) * counted.attention


def test_no_choice_without_offload_saved() -> None:
    p = plan({})
    assert p.recompute is None and p.to_json()["offload_saved"] is None and "offload_saved" not in p.table()


def test_assumed_rates_are_noted() -> None:
    p = plan({"offload_saved": "auto"}, rates=None)
    assert any("offload_saved: assumed host link 25.0 GB/s" in n for n in p.notes)


def test_a_model_that_cannot_be_counted_recomputes_with_a_note() -> None:
    cfg = load_config(device="cpu", dtype="float32", placement={"offload_saved": "auto"})
    p = make_plan(Stack(), cfg, batch_size=2, seq_len=16, rates=FAST)
    assert p.recompute is None
    assert any("the saved tensors could not be counted (the model has no config" in n for n in p.notes)


def test_forward_flops() -> None:
    shape = plan({}).shape
    tokens = 2 * 16
    assert forward_flops(shape, 2, 16) == 2 * shape.block_numel * tokens + 2 * 2 * 16**2 * 48


def test_memory_traffic_counts_what_element_wise_operations_move() -> None:
    """The counter adds the bytes an operation reads and writes; matmuls (FLOPs), views,
    factories and a cache's append to an empty tensor move none of the block's bytes."""
    from offload.plan.activations import _Traffic

    x, w = torch.empty(4, 8, device="meta"), torch.empty(8, 16, device="meta")
    on = [True]
    with _Traffic(on) as t:
        y = x @ w  # mm: counted in FLOPs
        x.t().contiguous()  # a view, then a copy of it: 128 bytes read, 128 written
        torch.empty(1000, device="meta")
        torch.cat([torch.empty(0, 16, device="meta"), y])
        assert t.nbytes == 256
        torch.nn.functional.silu(y)  # 4 x 16 float32 read and written
        assert t.nbytes == 256 + 2 * 4 * 16 * 4
        on[0] = False
        y * 2  # outside the block: not counted
    assert t.nbytes == 768


def test_the_blocks_element_wise_traffic_grows_with_its_tokens_and_costs_time() -> None:
    from offload.plan.activations import block_cost

    model = tiny("llama")
    one, two = count_block(model, "float32", 2, 16), count_block(model, "float32", 2, 32)
    # Linear in the tokens (no seq^2 term outside attention), but for the two norms' weights,
    # read once whatever the tokens (hidden size 48, float32).
    assert one.elementwise > 0 and 2 * one.elementwise - two.elementwise == 2 * 48 * 4
    shape = plan({}).shape
    plain = block_cost(shape, one, FAST, 2, 16)
    memory = block_cost(shape, one, dataclasses.replace(FAST, memory_bytes_s=1e6), 2, 16)
    seconds = one.elementwise / 1e6
    assert memory.forward_s == pytest.approx(plain.forward_s + seconds)
    assert memory.backward_s == pytest.approx(plain.backward_s + 2 * seconds)
    assert memory.attention_s == plain.attention_s  # a block keeping its attention still runs it


def test_cli_shows_the_choice_and_checks_rates(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "recipes/tiny.yaml", "--no-detect", "--set", "offload.placement.offload_saved=auto"]
    assert main([*args, "--link-gbs", "1000", "--tflops", "0.001", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["offload_saved"]["blocks"] == list(range(out["model"]["blocks"]))
    assert main([*args, "--link-gbs", "0"]) == 2
    assert "--link-gbs 0.0: must be > 0" in capsys.readouterr().err


def test_meta_count_needs_no_memory() -> None:
    """A 7B-shaped block at 32K tokens is counted in a moment, without allocating it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = saved_bytes_per_block(model, "bfloat16", 1, 32768)
    assert 20 * 32768 * 4096 < n < 80 * 32768 * 4096  # tens of bytes per token and hidden unit


ON_DISK = 4 * -(-PER_BLOCK // 4096) * 4096  # every block's boundary state, padded, each way


def disk_at(bytes_s: float, rates: Rates = FAST) -> Rates:
    return dataclasses.replace(rates, disk_write_bytes_s=bytes_s, disk_read_bytes_s=bytes_s)


def test_a_slow_disk_bounds_the_plans_step_and_says_so() -> None:
    """Boundary states on nvme at 1 byte/s: each phase waits ON_DISK seconds for the disk, and
    no keep shortens that."""
    p = plan({"activations": "nvme", "offload_saved": "auto"}, disk_at(1.0))
    without = plan({"activations": "nvme", "offload_saved": "auto"})  # FAST: no disk rates
    assert p.recompute is not None and without.recompute is not None
    assert p.recompute.keep == (Keep.RECOMPUTE,) * 4 and p.recompute.bound == "the disk"
    assert 2 * ON_DISK <= p.recompute.recompute_step_s < 2 * ON_DISK + without.recompute.recompute_step_s
    assert "offload_saved: recompute every block (est. step 65536.0" in p.table()
    assert "bound by the disk): the best keep" in p.table()
    assert f"the disk, {ON_DISK:.3f} s writing the boundary states in forward" in p.table()
    assert p.to_json()["offload_saved"]["bound"] == "the disk"


def test_a_disk_that_bounds_the_choice_is_named() -> None:
    """A disk that reads the boundary states back in backward's compute less half a forward of
    every block: keeps shorten backward only that far, and the line says the disk bounds it."""
    from offload.plan.activations import block_cost

    model = tiny("llama", layers=4)
    cost = block_cost(plan({}).shape, count_block(model, "float32", 2, 16), FAST, 2, 16)
    floor = 4 * cost.backward_s + 2 * cost.forward_s  # seconds the disk needs in backward
    rates = dataclasses.replace(disk_at(1e15), disk_read_bytes_s=ON_DISK / floor)  # writes keep pace
    p = plan({"activations": "nvme", "offload_saved": "auto"}, rates)
    c = p.recompute
    assert c is not None and any(c.offload)
    assert c.bound == "GPU compute" and c.kept_bound == "the disk"
    assert c.step_s == pytest.approx(c.recompute_step_s - 2 * cost.forward_s)
    assert "recomputing is bound by GPU compute, the choice by the disk)" in p.table()


@pytest.mark.parametrize("tier", ["gpu", "host"])
def test_the_disk_counts_only_for_boundary_states_on_nvme(tier: str) -> None:
    placement = {"activations": tier, "offload_saved": "auto"}
    assert plan(placement, disk_at(1.0)).recompute == plan(placement).recompute
    assert not any("the disk" in n for n in plan(placement, rates=None).notes)


def test_the_assumed_disk_rate_is_noted() -> None:
    p = plan({"activations": "nvme", "offload_saved": "auto"}, rates=None)
    assert any(
        "offload_saved: assumed the disk at 2.0 GB/s writing, 2.0 GB/s reading for the boundary states "
        "(detection is off; see --disk-gbs)" in n
        for n in p.notes
    )


def test_detection_measures_the_disk_of_the_first_nvme_dir(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With detection on (on any machine) the disk is measured where the boundary states go; a
    directory that cannot be measured leaves the assumed rate, and the note says why."""
    import offload.plan.activations as pa

    seen: list[str] = []

    def small(directory: str) -> tuple[float, float]:
        seen.append(directory)
        return measure_disk(directory, 1 << 20)

    monkeypatch.setattr(pa, "measure_disk", small)

    def notes(dirs: list[str]) -> list[str]:
        cfg = load_config(
            device="cpu",
            dtype="float32",
            placement={"activations": "nvme", "offload_saved": "auto"},
            nvme_dirs=dirs,
        )
        return list(make_plan(tiny("llama", layers=4), cfg, batch_size=2, seq_len=16, detect=True).notes)

    measured = notes([str(disk_dir), "/nonexistent/b"])
    assert seen == [str(disk_dir)]
    assert any(
        f"offload_saved: measured the disk of nvme_dirs[0] ({disk_dir}) for the boundary" in n
        for n in measured
    )
    missing = notes([str(disk_dir / "missing")])
    assert any(
        "offload_saved: assumed the disk at 2.0 GB/s writing, 2.0 GB/s reading for the boundary states "
        f"(nvme_dirs[0] could not be measured: {disk_dir / 'missing'} does not exist" in n
        for n in missing
    )


def test_cli_disk_rate(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "plan",
        "recipes/tiny.yaml",
        "--no-detect",
        "--set",
        "offload.placement.offload_saved=auto",
        "--set",
        "offload.placement.activations=nvme",
    ]
    assert main([*args, "--disk-gbs", "1e-9"]) == 0
    assert "bound by the disk)" in capsys.readouterr().out
    assert main([*args, "--disk-gbs", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["offload_saved"]["bound"] != "the disk"
    for bad in ("0", "-2"):
        assert main([*args, "--disk-gbs", bad]) == 2
        assert f"--disk-gbs {float(bad)}: must be > 0" in capsys.readouterr().err


def test_the_plan_sizes_nvme_staging_with_the_keeps_and_counts_it() -> None:
    """Eight blocks whose boundary states the disk writes far slower than the forward computes:
    auto takes the four staging leases more that a forward's groups can use, says so, and the
    plan's host column counts them; on a fast disk it takes none."""
    cfg = load_config(
        device="cpu",
        dtype="float32",
        placement={"activations": "nvme", "offload_saved": "auto"},
        nvme_dirs=["/tmp/x"],
    )
    padded = -(-PER_BLOCK // 4096) * 4096
    slow = make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16, rates=disk_at(1.0))
    assert slow.recompute is not None and slow.recompute.extra_leases == 4
    assert slow.get("activation_staging", Tier.HOST) == (ACTIVATION_STAGING + 4) * padded
    assert "; staging 4 -> 8 leases (0.0 GiB more): the forward runs" in slow.table()
    fast = make_plan(tiny("llama", layers=8), cfg, batch_size=2, seq_len=16, rates=disk_at(1e15))
    assert fast.recompute is not None and fast.recompute.extra_leases == 0
    assert fast.get("activation_staging", Tier.HOST) == ACTIVATION_STAGING * padded
    # A host budget that holds the state but not one lease more: none are taken.
    tight = {"host_bytes": slow.total(Tier.HOST) - 4 * padded + padded // 2}
    cfg_tight = load_config(
        device="cpu",
        dtype="float32",
        placement={"activations": "nvme", "offload_saved": "auto"},
        nvme_dirs=["/tmp/x"],
        budgets=tight,
    )
    held = make_plan(tiny("llama", layers=8), cfg_tight, batch_size=2, seq_len=16, rates=disk_at(1.0))
    assert held.recompute is not None and held.recompute.extra_leases < 4


def test_the_plan_counts_the_wait_for_the_updates_the_next_forward_needs_first() -> None:
    """Between backward and the next forward the device waits for the CPU's updates of what that
    forward needs first: the residents (in host memory), whose gradients land last, and the
    first streamed block. Device blocks before it hide its update; residents on the device have
    none to wait for."""
    model = tiny("llama", layers=4)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    resident = sum(p.numel() for p in model.parameters()) - 4 * block
    adam = 1e6
    rates = dataclasses.replace(FAST, adam_params_s=adam)  # the link's share is negligible

    def wait(**placement: object) -> float:
        p = plan({"offload_saved": "auto", **placement}, rates)
        assert p.recompute is not None
        return p.recompute.phases.get("wait_s", 0.0)

    # (to the plan's counts of the two, which pad and group parameters their own way)
    assert wait(device_blocks=0, device_residents=False) == pytest.approx((resident + block) / adam, rel=0.01)
    assert wait(device_blocks=0, device_residents=True) == pytest.approx(block / adam, rel=0.01)
    assert wait(device_blocks=4, device_residents=True) == 0.0  # nothing streams
    p = plan({"offload_saved": "auto", "device_blocks": 0, "device_residents": False}, rates)
    assert "s of it waiting for the CPU's updates before the next forward" in p.table()
    assert (
        "waiting for the CPU's updates"
        not in plan({"offload_saved": "auto", "device_blocks": 4}, rates).table()
    )
    # One device block: its forward and backward (a few microseconds at FAST) hide almost none
    # of the next block's update.
    assert 0 < wait(device_blocks=1, device_residents=True) < block / adam


def test_device_blocks_hide_the_first_streamed_blocks_update() -> None:
    from offload.plan.activations import Room, update_wait
    from offload.plan.recompute import BlockCost, Link

    cost = BlockCost(forward_s=0.02, backward_s=0.04, saved_bytes=0)
    room = Room(None, None, Link(1e9, 1e9), 0, residents_s=0.05, first_block_s=0.1)
    assert update_wait(room, cost) == pytest.approx(0.15)  # every block streams: all of it
    assert update_wait(dataclasses.replace(room, device_blocks=1), cost) == pytest.approx(0.09)
    assert update_wait(dataclasses.replace(room, device_blocks=2), cost) == pytest.approx(0.05)


def test_the_wait_lengthens_the_estimated_step() -> None:
    from offload.plan.recompute import BlockCost, Bounds, Link, estimate

    costs = [BlockCost(forward_s=0.02, backward_s=0.04, saved_bytes=0)] * 4
    keep = [Keep.RECOMPUTE] * 4
    base = estimate(costs, Link(1e12, 1e12), keep, Bounds(other_s=0.01))
    waited = estimate(costs, Link(1e12, 1e12), keep, Bounds(other_s=0.01, wait_s=0.05))
    assert waited.step_s == pytest.approx(base.step_s + 0.05)
    with pytest.raises(ValueError, match="wait_s must be >= 0"):
        Bounds(wait_s=-1.0)
