"""The streaming engine on a CUDA device (skipped without one; run on the GPU machine)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import LlamaForCausalLM

import offload
from tests.models import Stack, small_llama

# Deterministic cuBLAS (for the race test) must be configured before the first cuBLAS handle.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def llama(seed: int = 0) -> LlamaForCausalLM:
    return small_llama(kv_heads=4, seed=seed)  # grouped keys and values


def test_bf16_loss_curve_matches_autocast_run() -> None:
    """bf16 weights streamed vs fp32 weights on the GPU under bf16 autocast: same curve within
    bf16 tolerance (the two differ in where bf16 rounding happens, not in the mathematics)."""
    ref = llama().cuda()
    ours, opt = offload.wrap(
        copy.deepcopy(ref).cpu(), device="cuda", dtype="bfloat16", optimizer={"lr": 2e-3}
    )
    ropt = torch.optim.AdamW(ref.parameters(), lr=2e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (30, 4, 128), generator=g)  # a small vocabulary: learnable
    ref_losses, losses = [], []
    for ids in data:
        ids = ids.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        ropt.step()
        ropt.zero_grad()
        ref_losses.append(loss.item())
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # it learns
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 0.05 + 0.02 * abs(b), (losses, ref_losses)


def train_stack(model: torch.nn.Module, step, steps: int = 6) -> list[float]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(2, 3, 8, generator=g).cuda()
        y = torch.randn(2, 3, generator=g).cuda()
        loss = model(x, y)
        loss.backward()
        step()
        out.append(loss.item())
    return out


class HostAdamW:
    """The reference's optimizer, placed as offload places it: torch's fused AdamW on fp32 host
    copies, except for the parameters of the first device_blocks layers and then (the
    device_residents default) those outside the layers too, updated on the GPU (the two kernels
    round differently, so the reference must use the same one for each)."""

    def __init__(self, model: Stack, lr: float, device_blocks: int = 0) -> None:
        on_device = {id(p) for layer in model.layers[:device_blocks] for p in layer.parameters()}
        if device_blocks:
            layers = {id(p) for p in model.layers.parameters()}
            on_device |= {id(p) for p in model.parameters() if id(p) not in layers}
        self.params = [p for p in model.parameters() if id(p) not in on_device]
        self.host = [p.detach().cpu().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.host, lr=lr, weight_decay=0.0, fused=True)
        gpu = [p for p in model.parameters() if id(p) in on_device]
        self.gpu = torch.optim.AdamW(gpu, lr=lr, weight_decay=0.0, fused=True) if gpu else None

    def __call__(self) -> None:
        for p, h in zip(self.params, self.host):
            h.grad = p.grad.cpu()
        self.opt.step()
        if self.gpu is not None:
            self.gpu.step()
            self.gpu.zero_grad()
        with torch.no_grad():
            for p, h in zip(self.params, self.host):
                p.copy_(h)
                p.grad = None


@pytest.mark.parametrize(("slots", "device_blocks"), [(2, 0), (3, 0), (2, 5)])
@pytest.mark.parametrize("overlap", [False, True])
def test_races_show_up_as_wrong_numbers(slots: int, device_blocks: int, overlap: bool) -> None:
    """Blocks of 16 MiB of weights and almost no compute: copies, not kernels, dominate, so a
    missing wait between a slot's copy and its use (or an update and its upload) changes the
    result. With deterministic kernels and the same host optimizer the runs must agree exactly."""
    torch.use_deterministic_algorithms(True)
    try:
        ref = Stack(d=2048, layers=12).cuda()
        model, opt = offload.wrap(
            copy.deepcopy(ref).cpu(),
            device="cuda",
            dtype="float32",
            slots=slots,
            optimizer={"lr": 1e-3, "overlap_backward": overlap},
            placement={"device_blocks": device_blocks},
        )
        expect = train_stack(ref, HostAdamW(ref, 1e-3, device_blocks))

        def step() -> None:
            opt.step()
            opt.zero_grad()

        got = train_stack(model, step)
    finally:
        torch.use_deterministic_algorithms(False)
    assert got == expect
    state = offload.state_dict(model)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v.cpu()), k


def test_trace_has_every_lane(tmp_path) -> None:
    path = tmp_path / "trace.json"
    model, opt = offload.wrap(Stack(d=256, layers=4), device="cuda", dtype="float32", trace=str(path))

    def step() -> None:
        opt.step()
        opt.zero_grad()

    train_stack(model, step, steps=2)
    model.runtime.wait_updates()
    model.runtime.tracer.write()
    import json

    events = json.loads(path.read_text())["traceEvents"]
    names = {e["name"] for e in events}
    assert {"forward", "recompute+backward", "h2d", "d2h", "adamw"} <= names
