"""placement.gradients gpu: the streamed blocks' micro-batches add into fp32 sums on the compute
device, and only the sum crosses to host, once a step (Executor.send_sums). The exactness tests
against plain PyTorch are in test_wrap_exact.py; these compare against the host's sums, check
the plan's bytes, and run on CUDA where there is one."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import offload
from offload.config import Tier, load_config
from offload.engine.trace import LANES
from offload.plan import make_plan
from tests.models import Stack, batches, run_steps, tiny


def train(model: torch.nn.Module, gradients: str, accum: int, device: str = "cpu", **optimizer: object):
    wrapped, opt = offload.wrap(
        model,
        device=device,
        dtype="bfloat16",
        optimizer={"lr": 3e-3, "weight_decay": 0.1, **optimizer},
        placement={"gradients": gradients},
    )
    data = batches(3 * accum)
    if device != "cpu":
        data = [d.to(device) for d in data]
    losses = run_steps(wrapped, opt, 3, accum, lambda step, micro: data[step * accum + micro])
    state = offload.state_dict(wrapped)
    wrapped.runtime.close()
    return losses, state


@pytest.mark.parametrize(("accum", "clip"), [(3, 0.5), (3, None), (1, 0.5)])
def test_bf16_sums_equal_the_hosts(accum: int, clip: float | None) -> None:
    """In bf16 the device's fp32 sum of bf16 gradients is bit for bit the host's (each addition
    widens exactly, in the same order), and so is the clipping norm taken from it."""
    ref = tiny("llama")
    host = train(copy.deepcopy(ref), "host", accum, max_grad_norm=clip)
    gpu = train(copy.deepcopy(ref), "gpu", accum, max_grad_norm=clip)
    assert host[0] == gpu[0]
    for key, value in host[1].items():
        assert torch.equal(gpu[1][key], value), key


def test_overlap_backward_sends_each_sum_as_its_backward_ends() -> None:
    """overlap_backward (one backward per step): each block's update is queued during backward,
    its sum sent to host first; the result is the host path's."""
    ref = tiny("llama")
    host = train(copy.deepcopy(ref), "host", 1, overlap_backward=True)
    gpu = train(copy.deepcopy(ref), "gpu", 1, overlap_backward=True)
    assert host[0] == gpu[0]
    for key, value in host[1].items():
        assert torch.equal(gpu[1][key], value), key


def test_overlap_backward_refuses_a_second_backward() -> None:
    model, _opt = offload.wrap(
        tiny("llama"), device="cpu", optimizer={"overlap_backward": True}, placement={"gradients": "gpu"}
    )
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="turn overlap_backward off to accumulate"):
        model(input_ids=ids, labels=ids).loss.backward()
    model.runtime.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("device_blocks", [0, 2])
def test_plan_counts_the_sums_on_the_device(dtype: str, device_blocks: int) -> None:
    """The plan's bytes are what wrap allocates: an fp32 sum per streamed block in the gpu column
    (made by its first backward), none on the host, and fp32 host gradients in the pinned pool."""
    model = tiny("llama", layers=4)
    placement = {"gradients": "gpu", "device_blocks": device_blocks}
    cfg = load_config(None, device="cpu", dtype=dtype, placement=placement)
    plan = make_plan(model, cfg, batch_size=2, seq_len=16, grad_accum=2)
    host_plan = make_plan(
        model,
        load_config(None, device="cpu", dtype=dtype, placement={"device_blocks": device_blocks}),
        batch_size=2,
        seq_len=16,
        grad_accum=2,
    )
    wrapped, opt = offload.wrap(model, cfg)
    rt = wrapped.runtime
    try:
        assert plan.placement["gradients"] is Tier.GPU
        streamed = [r for r in rt.blocks if not r.on_device]
        assert len(streamed) == 4 - device_blocks
        assert all(r.sums_on_device and r.grad.dtype == torch.float32 for r in streamed)
        assert not rt.resident.sums_on_device  # the residents' gradients take their own way
        assert plan.pinned_bytes == rt.pool.config.capacity
        assert plan.store_bytes(Tier.HOST) == sum(r.state_bytes() for r in rt.records() if not r.on_device)
        run_steps(wrapped, opt, 1, 2, lambda step, micro: batches(2)[micro])
        sums = sum(r.dev_sum.numel() * 4 for r in streamed)
        on_device_sums = sum(r.grad_acc.numel() * 4 for r in rt.blocks if r.on_device)
        assert plan.get("grad_accum", Tier.GPU) == sums + on_device_sums
        assert plan.get("grad_accum", Tier.HOST) == 0
        assert all(r.grad_acc is None for r in streamed)  # nothing folded on the host
        # Against the host's sums: 4 bytes a parameter moved to the device, and in bf16 the host
        # gradient grows from 2 to 4 bytes, in place of the 4-byte host sum.
        host_sums = host_plan.get("grad_accum", Tier.HOST)
        assert host_sums == sums
        grown = (2 if dtype == "bfloat16" else 0) * sums // 4
        assert plan.get("gradients", Tier.HOST) == host_plan.get("gradients", Tier.HOST) + grown
    finally:
        rt.close()


def test_plan_says_where_the_sums_are() -> None:
    cfg = load_config(None, device="cpu", placement={"gradients": "gpu"})
    plan = make_plan(tiny("llama"), cfg, batch_size=1, seq_len=8, grad_accum=4)
    assert not any("gradients gpu" in note for note in plan.notes)  # built now: no "not built" note
    assert "gradients gpu" in plan.table()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("accum", "clip"), [(1, None), (4, None), (4, 1.0)])
def test_cuda_sums_equal_the_hosts(accum: int, clip: float | None) -> None:
    """On CUDA: the sums are made on the device from the staging buffer on the d2h stream, sent
    to host at step() and waited for by each update; the weights after three steps are the
    host-summing run's, bit for bit, with deterministic kernels. With clipping the norm of
    accumulated gradients is taken on the device instead of the host's CPU: the same norms within
    rounding (as the single micro-batch's device norm already is), and so the same weights
    within that rounding, as Adam amplifies it where a gradient is near zero."""
    torch.use_deterministic_algorithms(True)
    try:
        ref = Stack(d=1024, layers=6)
        results, norms = [], []
        for gradients in ("host", "gpu"):
            model, opt = offload.wrap(
                copy.deepcopy(ref),
                device="cuda",
                dtype="bfloat16",
                optimizer={"lr": 1e-3, "max_grad_norm": clip},
                placement={"gradients": gradients},
            )
            torch.manual_seed(0)
            xs = [
                (torch.randn(16, 8, device="cuda").bfloat16(), torch.randn(16, device="cuda").bfloat16())
                for _ in range(3 * accum)
            ]
            for step in range(3):
                for micro in range(accum):
                    (model(*xs[step * accum + micro]) / accum).backward()
                opt.step()
                norms.append(opt.last_grad_norm)
                opt.zero_grad()
            if gradients == "gpu":
                assert all(r.dev_sum is not None and r.dev_sum.is_cuda for r in model.runtime.blocks)
            results.append(offload.state_dict(model))
            model.runtime.close()
    finally:
        torch.use_deterministic_algorithms(False)
    if clip is None:
        for key, value in results[0].items():
            assert torch.equal(results[1][key], value), key
        return
    host_norms, gpu_norms = norms[:3], norms[3:]
    assert all(n is not None and n > clip for n in host_norms), (host_norms, gpu_norms)  # clipping scaled
    # The host CPU's fp32 reduction is the coarser one: 1e-4 relative apart at this size.
    torch.testing.assert_close(torch.tensor(gpu_norms), torch.tensor(host_norms), rtol=1e-3, atol=0)
    host = torch.cat([v.flatten() for v in results[0].values()])
    gpu = torch.cat([results[1][k].flatten() for k in results[0]])
    assert float((gpu - host).norm() / host.norm()) <= 1e-3


def test_trace_shows_the_additions_on_the_d2h_lane(tmp_path) -> None:
    path = tmp_path / "trace.json"
    model, opt = offload.wrap(tiny("llama"), device="cpu", placement={"gradients": "gpu"}, trace=str(path))
    run_steps(model, opt, 1, 2, lambda step, micro: batches(2)[micro])
    model.runtime.tracer.write(str(path))
    model.runtime.close()
    events = json.loads(path.read_text())["traceEvents"]
    sums = [e for e in events if e.get("name") == "sum"]
    assert len(sums) == 2 * len(model.runtime.blocks)  # one per block and micro-batch
    assert {e["tid"] for e in sums} == {LANES["d2h"]}


@pytest.mark.parametrize(
    ("accum", "gpu_gib", "gradients", "noted"),
    [(8, 80, "host", True), (1, 80, "host", False), (8, 80, "gpu", False), (8, None, "host", False)],
)
def test_plan_suggests_the_sums_on_the_device_where_they_fit(
    accum: int, gpu_gib: int | None, gradients: str, noted: bool
) -> None:
    """Accumulating with the sums on the host, and room on the device for them: the plan says
    so (not without accumulation, not when they are there already, not without a gpu budget)."""
    budgets = {"gpu_bytes": None if gpu_gib is None else gpu_gib * 2**30}
    cfg = load_config(None, device="cuda", budgets=budgets, placement={"gradients": gradients})
    plan = make_plan(tiny("llama"), cfg, batch_size=1, seq_len=8, grad_accum=accum)
    assert any(n.startswith("gradients gpu would fit") for n in plan.notes) == noted


def test_plan_suggests_the_sums_only_where_the_device_holds_them() -> None:
    """The device's budget less its margin holds the plan exactly: no room for the sums, no
    note; with room for exactly the sums (4 bytes a streamed parameter), the note."""
    model = tiny("llama")

    def plan(gpu_bytes: int | None):
        cfg = load_config(
            None, device="cuda", budgets={"gpu_bytes": gpu_bytes}, placement={"device_blocks": 1}
        )
        return make_plan(model, cfg, batch_size=1, seq_len=8, grad_accum=8)

    exact = plan(None).needed[Tier.GPU] + (2 << 30)  # DEVICE_MARGIN_BYTES
    sums = 4 * 2 * plan(None).shape.block_numel  # the two streamed blocks'
    assert not any(n.startswith("gradients gpu would fit") for n in plan(exact).notes)
    assert not any(n.startswith("gradients gpu would fit") for n in plan(exact + sums - 1).notes)
    assert any(n.startswith("gradients gpu would fit") for n in plan(exact + sums).notes)


@pytest.mark.parametrize(
    ("accum", "room", "chosen"), [(8, True, Tier.GPU), (8, False, Tier.HOST), (1, True, Tier.HOST)]
)
def test_gradients_auto_puts_accumulated_sums_on_the_device_where_they_fit(
    accum: int, room: bool, chosen: Tier
) -> None:
    """gradients auto: gpu when micro-batches are accumulated and the sums fit beside the rest
    (after the device blocks took theirs), counted in the plan's gpu column; else the host."""
    model = tiny("llama")

    def plan(gpu_bytes: int | None):
        cfg = load_config(
            None,
            device="cuda",
            budgets={"gpu_bytes": gpu_bytes},
            placement={"gradients": "auto", "device_blocks": 1},
        )
        return make_plan(model, cfg, batch_size=1, seq_len=8, grad_accum=accum)

    without = plan(None)
    sums = 4 * 2 * without.shape.block_numel  # the two streamed blocks'
    made = plan(without.needed[Tier.GPU] + (2 << 30) + (sums if room else sums - 1))
    assert made.placement["gradients"] is chosen
    on_device = chosen is Tier.GPU
    assert made.get("grad_accum", Tier.GPU) == (sums if on_device else 0) + (
        4 * made.shape.block_numel if accum > 1 else 0
    )
    assert any(n.startswith("gradients auto: gpu") for n in made.notes) == on_device
