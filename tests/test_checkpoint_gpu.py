"""Asynchronous checkpoints of device records on a CUDA device (skipped without one; run on the GPU
machine).

Records kept on the device (``placement.device_blocks``) are updated by kernels on the compute
stream, where no capture fence reaches: ``save()`` snapshots them there (copies queued after this
step's update kernels, before the next step's), to spare device memory or, when the device is
short of it, to host memory; the writer writes the snapshots later, while training goes on. A gate
holds the writer back from the device snapshots until the following steps have changed the live
records, so a writer that read the live records, or a snapshot not ordered after the update
kernels, shows up. bf16 training with deterministic kernels: the checkpoint equals the state at
the save bit for bit, and a run resumed from it the run that went on.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import offload
from offload.checkpoint import capture, job, load, save, verify
from offload.checkpoint import state as ckpt_state
from offload.checkpoint.format import KINDS, read_manifest, tensor_key
from tests.models import run_steps
from tests.test_wrap_gpu import llama

# Deterministic cuBLAS must be configured before the first cuBLAS handle.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE_BLOCKS = 2  # of llama()'s 4


def make(overlap: bool) -> tuple[Any, Any]:
    model, opt = offload.wrap(
        llama(),
        device="cuda",
        dtype="bfloat16",
        optimizer={"lr": 2e-3, "weight_decay": 0.1, "overlap_backward": overlap},
        placement={"device_blocks": DEVICE_BLOCKS},
    )
    assert sum(r.on_device for r in model.runtime.blocks) == DEVICE_BLOCKS
    return model, opt


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (2, 128), generator=g).cuda() for _ in range(n)]


def train(model: Any, opt: Any, data: list[torch.Tensor]) -> list[float]:
    return run_steps(model, opt, len(data), 1, lambda step, _: data[step])


def optimizer_state(model: Any) -> tuple[dict[str, torch.Tensor], set[str]]:
    """master, exp_avg and exp_avg_sq of every parameter, keyed as a checkpoint keys them, copied
    to the host now (a device record's copy on the current stream: after every update kernel
    queued so far), and the keys of the device records."""
    rt = model.runtime
    rt.wait_updates()
    out, on_device = {}, set()
    for rec, refs in ckpt_state.params_of(rt):
        with ckpt_state.optimizer_state(rt, rec) as held:
            for ref in refs:
                for kind, flat in zip(KINDS, held):
                    key = tensor_key(kind, ref.names[0])
                    out[key] = ref.view(flat).detach().to("cpu", copy=True)
                    if rec.on_device:
                        on_device.add(key)
    return out, on_device


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


class DeviceGate:
    """Holds the writer before it writes a device snapshot until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        write = job.SaveJob._write
        gate = self

        def gated(self: job.SaveJob, plan: job.RecordPlan) -> None:
            if id(plan.rec) in self.snaps:
                assert gate.open.wait(120), "the test never opened the gate"
            write(self, plan)

        monkeypatch.setattr(job.SaveJob, "_write", gated)


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}: {key}"


@pytest.mark.parametrize("room", ["device", "host"])
@pytest.mark.parametrize("overlap", [False, True], ids=["step", "overlap_backward"])
def test_async_save_of_device_records_is_the_step_saved(
    room: str, overlap: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """room "host": the device has no room for the snapshot (the fallback: a synchronous copy to
    host memory at save())."""
    if room == "host":
        monkeypatch.setattr(capture, "_device_room", lambda device: 0)
    data = batches(6)
    torch.use_deterministic_algorithms(True)
    try:
        model, opt = make(overlap)
        losses = train(model, opt, data[:3])
        # Every host record ready at save(): the writer captures them all before it reaches the
        # gated snapshots (it takes a snapshot first only while no host record is ready), so the
        # steps below are never held waiting for a capture stuck behind the gate.
        model.runtime.wait_updates()
        gate = DeviceGate(monkeypatch)
        handle = save(model, opt, tmp_path / "ckpt", step=3)
        at_save, on_device = optimizer_state(model)
        losses += train(model, opt, data[3:])  # the live device records change; their snapshot waits
        went_on, _ = optimizer_state(model)
        assert on_device and any(not torch.equal(went_on[k], at_save[k]) for k in on_device)
        assert not handle.done()  # still held at the gate: the snapshots are written after the steps
        gate.open.set()
        path = handle.wait()
        assert handle.stats.device_copy == room
        model.runtime.close()

        assert verify(path) == []
        assert_equal(checkpoint_tensors(path), at_save, "checkpoint vs the state at save()")
        assert {p["step"] for p in read_manifest(path)["params"].values()} == {3}

        model, opt = make(overlap)
        load(model, opt, tmp_path / "ckpt")
        assert_equal(optimizer_state(model)[0], at_save, "loaded vs the state at save()")
        assert train(model, opt, data[3:]) == losses[3:]  # resumed: the same losses as the run that went on
        assert_equal(optimizer_state(model)[0], went_on, "resumed vs went on")
        model.runtime.close()
    finally:
        torch.use_deterministic_algorithms(False)


def test_save_every_step_in_place_on_cuda(tmp_path: Path) -> None:
    """keep_last=1, prune="before": every step saved over the files of the one before, none waited
    for (each save() waits for the one before); the last one loads as the state it saved."""
    data = batches(6)
    torch.use_deterministic_algorithms(True)
    try:
        model, opt = make(overlap=True)
        losses: list[float] = []
        handles = []
        for i in range(4):
            losses += train(model, opt, data[i : i + 1])
            handles.append(save(model, opt, tmp_path, step=i + 1, keep_last=1, prune="before"))
        at_save, _ = optimizer_state(model)
        losses += train(model, opt, data[4:])
        went_on, _ = optimizer_state(model)
        assert handles[-1].wait() == tmp_path / "step_000004"
        assert handles[-1].stats.device_copy == "device"
        assert handles[-1].stats.reused_bytes > 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004"]
        model.runtime.close()

        assert_equal(checkpoint_tensors(tmp_path / "step_000004"), at_save, "checkpoint vs save()")
        model, opt = make(overlap=True)
        load(model, opt, tmp_path)
        assert train(model, opt, data[4:]) == losses[4:]
        assert_equal(optimizer_state(model)[0], went_on, "resumed vs went on")
        model.runtime.close()
    finally:
        torch.use_deterministic_algorithms(False)
