"""Activation placement and offload-instead-of-recompute on a CUDA device (skipped without one;
run on the GPU machine): the same training as the default placement, and less device memory
with the boundary states in host memory."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import offload
from tests.models import Stack, run_steps
from tests.test_wrap_gpu import llama

# Deterministic cuBLAS must be configured before the first cuBLAS handle.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def train(model: torch.nn.Module, placement: dict, nvme: Path, steps: int = 4) -> tuple[list[float], dict]:
    wrapped, opt = offload.wrap(
        model,
        device="cuda",
        dtype="float32",
        optimizer={"lr": 1e-3},
        placement=placement,
        nvme_dirs=[str(nvme)],
    )
    losses = random_steps(wrapped, opt, steps, vocab=64, shape=(2, 128))
    state = offload.state_dict(wrapped)
    wrapped.runtime.close()
    return losses, state


def random_steps(wrapped: Any, opt: Any, steps: int, vocab: int, shape: tuple[int, int]) -> list[float]:
    """steps optimizer steps on seeded random tokens; the losses."""
    g = torch.Generator().manual_seed(0)
    return run_steps(wrapped, opt, steps, 1, lambda *_: torch.randint(0, vocab, shape, generator=g).cuda())


def test_host_and_nvme_boundaries_train_exactly_like_the_device(disk_dir: Path) -> None:
    """Moving a tensor to host memory and back changes no bit: with deterministic kernels the
    runs agree exactly."""
    torch.use_deterministic_algorithms(True)
    try:
        ref = llama()
        want = train(copy.deepcopy(ref), {}, disk_dir)
        for placement in ({"activations": "host"}, {"activations": "nvme"}):
            got = train(copy.deepcopy(ref), placement, disk_dir)
            assert got[0] == want[0], placement
            for key in want[1]:
                assert torch.equal(got[1][key], want[1][key]), (placement, key)
    finally:
        torch.use_deterministic_algorithms(False)


def test_offloaded_saved_tensors_train_like_recompute(disk_dir: Path) -> None:
    """Offload runs each block's forward once, with autograd; recompute runs it twice. The
    kernels may differ with autograd on (attention picks its backend from requires_grad), so
    the runs agree to float32 rounding, not bitwise."""
    ref = llama()
    want = train(copy.deepcopy(ref), {}, disk_dir)
    for placement in ({"offload_saved": "always"}, {"offload_saved": "auto", "activations": "host"}):
        got = train(copy.deepcopy(ref), placement, disk_dir)
        torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=1e-4, atol=1e-5)
        for key in want[1]:
            torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-3, atol=1e-5, msg=key)


def test_races_in_the_activation_copies_show_up() -> None:
    """Blocks with almost no compute: the copies dominate, so a missing wait between a copy out
    and the memory's reuse, or between a copy back and its use, changes the result."""
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for placement in ({}, {"activations": "host"}, {"offload_saved": "always", "activations": "host"}):
            model, opt = offload.wrap(
                Stack(d=1024, layers=12), device="cuda", dtype="float32", placement=placement
            )
            g = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(4):
                x = torch.randn(64, 256, 8, generator=g).cuda()
                y = torch.randn(64, 256, generator=g).cuda()
                loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            results.append((losses, offload.state_dict(model)))
            model.runtime.close()
    finally:
        torch.use_deterministic_algorithms(False)
    base = results[0]
    for losses, state in results[1:]:
        assert losses == base[0]
        for key in base[1]:
            assert torch.equal(state[key], base[1][key]), key


def test_host_boundaries_lower_the_device_peak() -> None:
    """With 12 blocks the device keeps every boundary state in the default placement and a
    window of a few with host placement: the peak drops by at least 40% of all of them."""

    def peak(placement: dict) -> int:
        torch.manual_seed(0)
        model, opt = offload.wrap(
            Stack(d=1024, layers=12), device="cuda", dtype="float32", placement=placement
        )
        x, y = torch.randn(8, 4096, 8).cuda(), torch.randn(8, 4096).cuda()
        model(x, y).backward()  # the first step maps the pools and warms the allocator
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        result = torch.cuda.max_memory_allocated()
        model.runtime.close()
        return result

    boundary = 12 * 8 * 4096 * 1024 * 4  # blocks x tokens x width x float32
    gpu, host = peak({}), peak({"activations": "host"})
    assert gpu - host >= 0.4 * boundary, (gpu, host, boundary)


def train_bf16(placement: dict, steps: int = 3) -> tuple[list[float], dict, object]:
    """A small Llama (8 heads of 32, no grouped keys: flash attention runs it in every torch
    version) in bfloat16, flash attention's dtype; batch 2 x 256."""
    from tests.models import small_llama

    wrapped, opt = offload.wrap(
        small_llama(),
        device="cuda",
        dtype="bfloat16",
        optimizer={"lr": 1e-3},
        placement=placement,
    )
    losses = random_steps(wrapped, opt, steps, vocab=512, shape=(2, 256))
    state = offload.state_dict(wrapped)
    acts = wrapped.runtime.activations
    wrapped.runtime.close()
    return losses, state, acts


def test_kept_graphs_and_attention_train_like_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping graphs on the device or attention outputs (flash attention's kernels called
    directly) trains like recomputing, to bfloat16 rounding; the attention calls of the
    recompute were answered from what forward kept."""
    from offload.engine import function
    from offload.engine.attention import Replay

    answered: list[Replay] = []

    class Spy(Replay):
        def __init__(self, records, index):  # type: ignore[no-untyped-def]
            super().__init__(records, index)
            answered.append(self)

    monkeypatch.setattr(function, "Replay", Spy)
    want = train_bf16({})
    for placement in (
        {"offload_saved": {"device": [0, 1, 2, 3]}},
        {"offload_saved": {"attention": [0, 1], "attention_host": [2, 3]}},
        {"offload_saved": {"host": [0], "device": [3], "attention": [1, 2]}, "activations": "host"},
    ):
        got = train_bf16(placement)
        torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=2e-2, atol=2e-2)
        for key in want[1]:
            torch.testing.assert_close(got[1][key], want[1][key], rtol=5e-2, atol=5e-3, msg=key)
    assert answered and all(r.records and r.records[0] is not None for r in answered)


def test_host_kept_graphs_do_not_pile_up_on_the_device() -> None:
    """Blocks with almost no compute per byte saved: the copies out fall behind, and without the
    window every block's saved tensors would wait on the device for theirs. With it, keeping
    every graph in host memory costs at most the window's groups beyond recomputing, in what
    tensors take at once (allocated) and, with one group more for the allocator (a group comes
    back as one buffer that the memory of its tensors in forward may not fit), in what the
    caching allocator reserves: freed memory whose reuse waits for events (record_stream) shows
    only there, as does a backward that brings groups back faster than compute frees them."""
    from torch.autograd.graph import saved_tensors_hooks

    from offload.engine.packing import Packing
    from offload.plan.recompute import SAVED_HELD, SAVED_WINDOW
    from tests.models import Block

    def saved_bytes() -> int:  # one block's saved tensors (freed on return)
        x = torch.randn(8, 4096, 1024, device="cuda")
        seen: list[torch.Tensor] = []
        block = Block(1024).cuda()
        with saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            block(x.requires_grad_())
        params = {p.data_ptr() for p in block.parameters()}
        return Packing([t for t in seen if t.data_ptr() not in params]).nbytes

    saved = saved_bytes()

    def peak(placement: dict) -> tuple[int, int]:
        torch.manual_seed(0)
        model, opt = offload.wrap(
            Stack(d=1024, layers=12), device="cuda", dtype="float32", placement=placement
        )
        xs, ys = torch.randn(8, 4096, 8).cuda(), torch.randn(8, 4096).cuda()
        model(xs, ys).backward()  # warms the pools and the allocator
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the reserved peak is then this step's, not an earlier run's cache
        torch.cuda.reset_peak_memory_stats()
        model(xs, ys).backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        result = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        model.runtime.close()
        del model, opt, xs, ys
        return result

    recompute, host = peak({}), peak({"offload_saved": "always"})
    assert host[0] - recompute[0] <= SAVED_WINDOW * saved, (host, recompute, saved)
    assert host[1] - recompute[1] <= SAVED_HELD * saved, (host, recompute, saved)
