"""Keeping a block's graph instead of recomputing it (offload/engine/saved.py, choice.py): the
pack hook's deduplication and what it leaves in place, exact gradients through a graph whose
saved tensors stayed on the device or went to host memory, what auto measures and decides, and
the config of the choice."""

from __future__ import annotations

import json
import types
import weakref
from dataclasses import replace

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import offload
from offload.config import ConfigError, PlacementConfig, Tier
from offload.engine.activations import HostStore
from offload.engine.choice import MeasuredChoice, Traffic, device_room, make_choice
from offload.engine.device import Device
from offload.engine.packing import storage_key
from offload.engine.saved import Packer, _Group, _unpack
from offload.plan.recompute import Choice, Keep, fixed, keep_margin
from tests.models import Stack, batches, tiny

CPU = Device("cpu")


def packed_graph(fn, *leaves: torch.Tensor, keep: tuple[torch.Tensor, ...] = ()):
    """Runs fn under the pack hook; returns its output, the packer and the store."""
    store = HostStore(CPU, blocks=1)
    group = _Group(store)
    packer = Packer(group, CPU.torch, {storage_key(t) for t in keep})
    with saved_tensors_hooks(packer.pack, _unpack):
        out = fn(*leaves)
    group.stored = store.put(0, packer.tensors)
    return out, packer, store


def test_a_tensor_saved_twice_is_stored_once() -> None:
    x = torch.randn(16, 8, requires_grad=True)

    def fn(x):
        return (x * x).sum() + (x.exp() * x).sum()

    out, packer, store = packed_graph(fn, x)
    assert len(packer.tensors) == 2  # x (saved three times) and exp(x)
    assert store.stored_bytes() == 2 * 16 * 8 * 4
    (g,) = torch.autograd.grad(out, [x])
    assert torch.equal(g, torch.autograd.grad(fn(x), [x])[0])  # the same kernels: bitwise
    store.close()


def test_views_of_one_storage_move_once() -> None:
    x = torch.randn(32, 32)
    h = torch.randn(32, 32, requires_grad=True)

    def fn(h):
        y = h @ x  # saves h (and x: a view kept by neither rule here, moved)
        return (y @ x.t()).sum() + (y * x[4:8].sum()).sum()

    out, packer, store = packed_graph(fn, h)
    xs = [t for t in packer.tensors if storage_key(t) == storage_key(x)]
    assert len(xs) == 2  # x and x.t(): two views ...
    stored = store._last[0] if store._last else None
    assert stored is not None and stored.packing is not None
    x_pieces = {
        p.piece for t, p in zip(packer.tensors, stored.packing.placed) if storage_key(t) == storage_key(x)
    }
    assert len(x_pieces) == 1  # ... moved as one span of their storage
    ref = torch.autograd.grad(fn(h), [h])[0]
    (g,) = torch.autograd.grad(out, [h])
    assert torch.equal(g, ref)
    store.close()


def test_weights_are_kept_by_reference_and_read_again_at_backward() -> None:
    """A weight buffer later overwritten and restored (a slot reused by other blocks, then
    re-filled by acquire) gives the gradient of the values it holds at backward."""
    slot = torch.randn(8, 8)
    w = slot.detach().requires_grad_()
    x = torch.randn(4, 8, requires_grad=True)
    out, packer, store = packed_graph(lambda x, w: torch.tanh(x @ w).sum(), x, w, keep=(slot,))
    assert all(storage_key(t) != storage_key(slot) for t in packer.tensors)
    original = slot.clone()
    slot.normal_()  # another block's weights in the slot
    slot.copy_(original)  # this block's again
    gx, gw = torch.autograd.grad(out, [x, w])
    x2, w2 = x.detach().requires_grad_(), original.clone().requires_grad_()
    rx, rw = torch.autograd.grad(torch.tanh(x2 @ w2).sum(), [x2, w2])
    assert torch.equal(gx, rx) and torch.equal(gw, rw)
    store.close()


def test_other_devices_and_small_tensors_stay_put() -> None:
    store = HostStore(CPU, blocks=1)
    packer = Packer(_Group(store), torch.device("meta"), set())
    t = torch.randn(3)
    assert packer.pack(t) is t  # not on the compute device
    small = Packer(_Group(store), CPU.torch, set(), min_bytes=1024)
    assert small.pack(t) is t and small.tensors == []
    store.close()


def train_auto(placement: dict, steps: int = 3, **kw):  # type: ignore[no-untyped-def]
    model, opt = offload.wrap(
        tiny("llama", layers=3), device="cpu", dtype="float32", placement=placement, **kw
    )
    acts = model.runtime.activations
    assert acts.measure is not None and acts.measure.decision is None
    for ids in batches(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, acts.measure


def test_auto_measures_one_step_then_decides() -> None:
    model, measure = train_auto({"offload_saved": "auto"})
    decision = measure.decision
    assert decision is not None and len(decision.keep) == 3
    assert model.runtime.executor.timer is not None  # a no-op once decided
    costs = measure.costs()
    assert all(c.saved_bytes > 0 and c.forward_s > 0 and c.backward_s >= 0 for c in costs)
    # Llama's attention is causal, unmasked, without dropout: keepable, and counted as the planner does.
    counted = offload.plan.activations.count_block(tiny("llama", layers=3), "float32", 2, 16)
    assert all(c.attention_bytes == counted.attention and 0 < c.attention_s <= c.forward_s for c in costs)
    assert measure.bounds().cpu_s > 0  # the CPU optimizer's updates of the measured step
    assert set(measure.decide_s) == {"sync", "costs", "link", "choose"}  # no staging on the device
    assert all(t >= 0 for t in measure.decide_s.values())
    assert decision.describe()
    model.runtime.close()


DECIDED = Choice((Keep.RECOMPUTE, Keep.DEVICE), 0.8, 1.0, 0, 1 << 20, "GPU compute")


def drive_auto(
    monkeypatch: pytest.MonkeyPatch, pass_seconds: list[float], decided: Choice = DECIDED
) -> tuple[MeasuredChoice, list[Keep]]:
    """A 2-block auto choice driven pass by pass on a clock that each pass advances by its
    entry of pass_seconds; its decision (made at the third pass) keeps block 1 on the device.
    Also returns what block 1 was told to keep in each pass."""
    clock = [0.0]
    monkeypatch.setattr(offload.engine.choice, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    m = MeasuredChoice(CPU, 2, Traffic(0, 0), set)
    monkeypatch.setattr(m, "_decide", lambda measured_s: decided)
    told = []
    for seconds in pass_seconds:
        m(0)
        told.append(m(1))
        m.done(1), m.done(0)
        clock[0] += seconds
    m(0)  # the next pass's start ends the last one
    return m, told


def test_auto_measures_its_choice_and_keeps_it_when_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up, the measured recompute (2 s), the choice's first pass (its allocations: 9 s), then
    its measured pass (1.5 s): faster, so the choice stands with the measured step beside the
    estimate."""
    m, told = drive_auto(monkeypatch, [3.0, 2.0, 9.0, 1.5])
    d = m.decision
    assert d is not None and d.keep == (Keep.RECOMPUTE, Keep.DEVICE) and not d.reverted
    assert told == [Keep.RECOMPUTE, Keep.RECOMPUTE, Keep.DEVICE, Keep.DEVICE]
    assert d.measured_step_s == pytest.approx(1.5) and not m.verifying
    assert d.recompute_measured_s == pytest.approx(2.0)
    assert (
        "est. step 0.800 s against 1.000 s recomputing, 20% faster; "
        "measured 1.500 s against 2.000 s recomputing, 25% faster;"
    ) in d.describe()
    assert d.to_json()["measured_step_s"] == pytest.approx(1.5)
    assert m(1) is Keep.DEVICE


def test_auto_goes_back_to_recomputing_when_its_choice_is_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = drive_auto(monkeypatch, [3.0, 2.0, 9.0, 2.5])
    d = m.decision
    assert d is not None and d.keep == (Keep.RECOMPUTE, Keep.RECOMPUTE)
    assert d.measured_step_s == pytest.approx(2.5) and not m.verifying
    assert d.reverted.startswith(
        "the choice (keep on the device 1 block: 1; recompute 1 block: 0 (est. step 0.800 s against"
    )
    assert d.reverted.endswith("measured 2.500 s a pass against 2.000 s recomputing")
    assert d.describe() == f"recompute every block: {d.reverted}"
    assert d.to_json()["reverted"] == d.reverted and d.to_json()["blocks"] == []
    assert m(0) is m(1) is Keep.RECOMPUTE


def test_auto_is_still_measuring_its_choice_after_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = drive_auto(monkeypatch, [3.0, 2.0, 9.0])
    assert m.verifying and m.decision is not None and m.decision.measured_step_s is None
    assert m(1) is Keep.DEVICE


STAGED = replace(
    DECIDED, staging="staging 4 -> 9 leases (5.0 GiB more): the forward runs 2.00 s further ahead"
)


def test_a_choice_that_grew_the_staging_is_compared_with_recomputing_on_the_new_leases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warm-up, the measured recompute with the old leases (2 s), a pass recomputing with the
    new ones (1.8 s), the choice's first pass, then its measured pass (1.5 s): compared with
    1.8 s, not 2 s."""
    m, told = drive_auto(monkeypatch, [3.0, 2.0, 1.8, 9.0, 1.5], STAGED)
    d = m.decision
    assert told == [Keep.RECOMPUTE] * 3 + [Keep.DEVICE] * 2
    assert d is not None and not d.reverted and d.measured_step_s == pytest.approx(1.5)
    assert d.recompute_measured_s == pytest.approx(1.8)
    assert "measured 1.500 s against 1.800 s recomputing, 17% faster" in d.describe()
    assert d.describe().endswith("; " + STAGED.staging)
    assert d.to_json()["recompute_measured_s"] == pytest.approx(1.8)


def test_a_choice_faster_than_the_old_leases_but_not_the_new_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1.9 s with the keeps: faster than the 2 s recomputing with the old leases, not than the
    1.8 s with the new ones, which is what the keeps must beat."""
    m, _ = drive_auto(monkeypatch, [3.0, 2.0, 1.8, 9.0, 1.9], STAGED)
    d = m.decision
    assert d is not None and d.keep == (Keep.RECOMPUTE, Keep.RECOMPUTE)
    assert d.reverted.endswith("measured 1.900 s a pass against 1.800 s recomputing")
    assert d.describe().endswith("; " + STAGED.staging)  # the leases stay


def test_auto_measures_its_choice_in_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real run the passes of a choice that keeps whole graphs (no recompute, so a backward
    path of its own) are counted too: after the decision, a warm-up pass and a measured one."""

    def every_graph_on_the_device(costs, link, host_bytes, device_bytes, bounds):  # type: ignore[no-untyped-def]
        return fixed(costs, link, [Keep.DEVICE] * len(costs), bounds)

    monkeypatch.setattr(offload.engine.choice, "choose", every_graph_on_the_device)
    model, m = train_auto({"offload_saved": "auto"}, steps=4)
    assert m.decision is not None and m.decision.blocks == [0, 1, 2] and m.verifying  # one pass of it so far
    model.runtime.close()
    model, m = train_auto({"offload_saved": "auto"}, steps=5)
    d = m.decision
    assert d is not None and d.measured_step_s is not None and d.measured_step_s > 0 and not m.verifying
    assert d.blocks == [0, 1, 2] if not d.reverted else d.blocks == []
    model.runtime.close()


def test_auto_keeps_nothing_on_the_device_without_room() -> None:
    """On the CPU the device is host memory, bounded by budgets.gpu_bytes: with none left
    beside what the plan puts there, nothing is kept (host-kept graphs need a window on the
    device too). A budget under the plan's own need is refused by wrap."""
    cfg = offload.config.load_config(None, device="cpu", dtype="float32")
    bare = offload.plan.make_plan(tiny("llama", layers=3), cfg, batch_size=1, seq_len=1).needed[Tier.GPU]
    with pytest.raises(offload.plan.PlanError, match=r"gpu: needs .* budget .* raise budgets.gpu_bytes"):
        train_auto({"offload_saved": "auto"}, budgets={"gpu_bytes": bare - 1})
    model, measure = train_auto({"offload_saved": "auto"}, budgets={"gpu_bytes": bare})
    assert measure.room()[0] == 0
    assert measure.decision is not None and set(measure.decision.keep) == {Keep.RECOMPUTE}
    model.runtime.close()


def test_fixed_choices() -> None:
    traffic, keys = Traffic(0, 0), lambda: set()
    assert make_choice("never", CPU, 4, traffic, keys) is None
    assert isinstance(make_choice("auto", CPU, 4, traffic, keys), MeasuredChoice)
    always = make_choice("always", CPU, 4, traffic, keys)
    assert always is not None and [always(i) for i in range(4)] == [Keep.HOST] * 4
    listed = make_choice([1], CPU, 4, traffic, keys)
    assert listed is not None and [listed(i) for i in range(3)] == [Keep.RECOMPUTE, Keep.HOST, Keep.RECOMPUTE]
    mapped = make_choice({"device": [3], "attention_host": [0]}, CPU, 4, traffic, keys)
    assert mapped is not None
    assert [mapped(i) for i in range(4)] == [Keep.ATTENTION_HOST, Keep.RECOMPUTE, Keep.RECOMPUTE, Keep.DEVICE]


def test_a_device_kept_graph_moves_nothing() -> None:
    model, _ = offload.wrap(
        tiny("llama", layers=3),
        device="cpu",
        dtype="float32",
        placement={"offload_saved": {"device": [0, 1, 2]}},
    )
    ids = batches(1)[0]
    loss = model(input_ids=ids, labels=ids).loss
    acts = model.runtime.activations
    assert acts.saved is not None and acts.saved._host.made is None and acts.stored_bytes() == 0
    loss.backward()
    model.runtime.close()


def test_kept_blocks_are_traced_on_the_compute_lane(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A trace of kept blocks (graphs on the device or host, attention kept) puts their forward
    and backward on the compute lane, as it does a recomputed block's."""
    from offload.engine.trace import LANES

    path = tmp_path / "trace.json"
    keep = {"device": [0], "host": [1], "attention": [2]}
    model, opt = offload.wrap(
        tiny("llama", layers=4),
        device="cpu",
        dtype="float32",
        placement={"offload_saved": keep},
        trace=str(path),
    )
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.runtime.tracer.write()
    model.runtime.close()
    events = json.loads(path.read_text())["traceEvents"]
    compute = [
        (e["name"], e["args"]["block"]) for e in events if e["ph"] == "X" and e["tid"] == LANES["compute"]
    ]
    forward = [("forward+save", 0), ("forward+save", 1), ("forward", 2), ("forward", 3)]
    backward = [("backward", 0), ("backward", 1), ("recompute+backward", 2), ("recompute+backward", 3)]
    assert sorted(compute) == sorted(forward + backward)


def test_frozen_weights_in_offloaded_blocks() -> None:
    def freeze(model):
        for block in model.model.layers:
            block.mlp.up_proj.weight.requires_grad_(False)
        return model

    results = []
    for placement in ({}, {"offload_saved": "always"}):
        model, opt = offload.wrap(
            freeze(tiny("llama", layers=3)), device="cpu", dtype="float32", placement=placement
        )
        for ids in batches(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        results.append(offload.state_dict(model))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_plain_stack_with_offloaded_blocks_matches() -> None:
    """A model that is not a Hugging Face one: an MSE regression over identical blocks."""
    states = []
    for placement in ({}, {"offload_saved": [1, 2], "activations": "host"}):
        model, opt = offload.wrap(Stack(layers=4), device="cpu", dtype="float32", placement=placement)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            x, y = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, generator=g)
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
        states.append(offload.state_dict(model))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "sometimes",
            r"placement.offload_saved = 'sometimes': expected one of 'never', 'auto', 'always' or list\[int\]",
        ),
        ([0, -1], r"offload_saved\[1\] = -1: must be a block index >= 0"),
        ([2, 2], r"offload_saved\[1\] = 2: is listed twice"),
        (
            {"gpu": [0]},
            r"offload_saved.gpu = \[0\]: unknown kind; expected one of device, host, attention, attention_host",
        ),
        ({"device": [0, -2]}, r"offload_saved.device\[1\] = -2: must be a block index >= 0"),
        (
            {"device": [0], "host": [1, 0]},
            r"offload_saved.host\[1\] = 0: is listed twice \(also under offload_saved.device\)",
        ),
        ({"host": "0-3"}, r"placement.offload_saved = \{'host': '0-3'\}: expected one of"),
    ],
)
def test_offload_saved_config_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        offload.config.load_config(placement={"offload_saved": value})


@pytest.mark.parametrize(
    ("value", "field"),
    [([3], r"offload_saved\[0\]"), ({"host": [0], "attention": [1, 3]}, r"offload_saved.attention\[1\]")],
)
def test_offload_saved_block_out_of_range(value: object, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"placement.{field} = 3: the model has 3 blocks \(0 to 2\)"):
        offload.wrap(
            tiny("llama", layers=3), device="cpu", dtype="float32", placement={"offload_saved": value}
        )


def test_placement_default_recomputes() -> None:
    assert PlacementConfig().offload_saved == "never"


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (
            {"activations": "host"},
            "a second backward \\(retain_graph=True\\) is not supported with placement.activations",
        ),
        (
            {"offload_saved": "always"},
            "a second backward \\(retain_graph=True\\) is not supported for blocks in",
        ),
    ],
)
def test_a_second_backward_through_one_graph(placement: dict, message: str) -> None:
    """The default placement keeps the inputs, so a graph can be run twice; moved ones are freed
    by the first backward, and the second says so."""
    ids = batches(1)[0]
    model, _ = offload.wrap(tiny("llama", layers=2), device="cpu", dtype="float32")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    loss.backward()
    model, _ = offload.wrap(tiny("llama", layers=2), device="cpu", dtype="float32", placement=placement)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=message):
        loss.backward()
    model.runtime.close()


def test_host_kept_groups_are_let_go_once_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd holds the pack hook, and so the Packer, until the block's backward: the Packer
    must hand its tensors over, or every host-kept group stays on the device until its backward
    (on the H100 a 12-block stack kept 8 groups more than recomputing, against a window of 2).
    On the CPU each copy is done when put returns: after forward only the last group put (held
    for backward, no round trip) is alive."""
    puts: list[list[weakref.ref]] = []
    put = HostStore.put

    def spy(self, index, tensors):  # type: ignore[no-untyped-def]
        tensors = list(tensors)
        puts.append([weakref.ref(t) for t in tensors])
        return put(self, index, tensors)

    monkeypatch.setattr(HostStore, "put", spy)
    model, _ = offload.wrap(
        Stack(layers=4), device="cpu", dtype="float32", placement={"offload_saved": "always"}
    )
    g = torch.Generator().manual_seed(0)
    loss = model(torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, generator=g))
    alive = [sum(r() is not None for r in refs) for refs in puts]
    assert len(alive) == 4 and alive[:3] == [0, 0, 0] and alive[3] == len(puts[3]) > 0, alive
    loss.backward()
    model.runtime.close()


def test_device_room_on_cuda() -> None:
    """What lies outside the allocator, the margin and the allocator's reserved peak come off
    the device (or the budget, if smaller)."""
    GiB = 2**30
    total, reserved, peak = 80 * GiB, 40 * GiB, 46 * GiB
    free = total - reserved - GiB  # 1 GiB outside the allocator (the CUDA context)
    assert device_room(total, free, reserved, peak) == total - GiB - keep_margin(total) - peak
    assert keep_margin(total) > 6 * GiB  # 8% of the device, more than 2 GiB
    budget = 60 * GiB
    assert device_room(total, free, reserved, peak, budget) == budget - GiB - keep_margin(budget) - peak
    assert device_room(total, free, reserved, 79 * GiB) == 0  # never negative
