"""What auto measures of the disk when the boundary states are on nvme (the NVMe store's
DiskClock, offload/engine/activations_nvme.py, read by offload/engine/choice.py): the bytes each
way and the seconds the disk was busy with them, on the CPU, and that measuring changes nothing
of the training."""

from __future__ import annotations

import copy
import threading
import types
from pathlib import Path

import pytest
import torch

import offload
import offload.engine.activations_nvme as nvme
from offload.engine.activations_nvme import DiskClock, DiskTime
from tests.models import batches, run_steps, tiny
from tests.test_wrap_exact import STEPS, train_reference

PADDED = -(-2 * 16 * 48 * 4 // 4096) * 4096  # one block's boundary state (batch x seq x hidden x fp32)


class Transfer:
    """A stand-in for an IoFuture: completes at ``end`` on the fake clock once the gate opens."""

    def __init__(self, nbytes: int, end: float, gate: threading.Event, now: list[float], fails: bool = False):
        self.nbytes, self.end, self.gate, self.now, self.fails = nbytes, end, gate, now, fails

    def wait(self) -> int:
        self.gate.wait()
        self.now[0] = self.end
        if self.fails:
            raise OSError(28, "No space left on device")
        return self.nbytes


def test_the_clock_counts_busy_time_once_per_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writes in flight together from 0 to 1 and 1.5 s, then one from 2 to 3: 2.5 s busy,
    not 3.5. A read overlapping a write counts in its own direction; a failed write moved
    nothing; transfers outside start()..stop() are not counted."""
    now = [0.0]
    monkeypatch.setattr(nvme, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    gate = threading.Event()
    clock = DiskClock()
    assert clock.submitted(Transfer(1, 0.1, gate, now), True) is not None and not clock.running
    assert clock.stop() == (DiskTime(), DiskTime())
    clock.start()
    clock.submitted(Transfer(4096, 1.0, gate, now), True)
    clock.submitted(Transfer(4096, 1.5, gate, now), True)
    now[0] = 2.0
    clock.submitted(Transfer(8192, 3.0, gate, now), True)
    now[0] = 2.5
    clock.submitted(Transfer(4096, 3.5, gate, now), False)
    now[0] = 3.6
    clock.submitted(Transfer(4096, 4.0, gate, now, fails=True), True)
    gate.set()
    written, read = clock.stop()
    assert written == DiskTime(16384, 2.5) and read == DiskTime(4096, 1.0)
    assert not clock.running
    clock.submitted(Transfer(4096, 5.0, gate, now), True)
    assert clock.stop() == (written, read)  # stopped: not counted


def wrap(placement: dict, disk_dir: Path, model: torch.nn.Module):  # type: ignore[no-untyped-def]
    return offload.wrap(
        model,
        device="cpu",
        dtype="float32",
        optimizer={"lr": 3e-3, "weight_decay": 0.1},
        placement=placement,
        nvme_dirs=[str(disk_dir)],
    )


def test_auto_measures_the_disk_and_trains_like_recomputing(disk_dir: Path) -> None:
    """Eight blocks, four staging leases: every block's state is written, the first four are
    read back. The measured pass gives the seconds the disk was busy each way as the phases'
    disk bounds; the training is bitwise that of recomputing every block, and of plain PyTorch
    with torch.optim.AdamW(fused=True) (tests/test_wrap_exact.py says why bitwise holds)."""
    ref, data = tiny("llama", layers=8), batches(STEPS)
    torch.manual_seed(123)
    want = train_reference(copy.deepcopy(ref), data, 1, 3e-3, 0.1, None, fused=True)
    runs = {}
    for name, placement in {
        "recompute": {"activations": "nvme"},
        "auto": {"activations": "nvme", "offload_saved": "auto"},
    }.items():
        torch.manual_seed(123)
        model, opt = wrap(placement, disk_dir, copy.deepcopy(ref))
        acts = model.runtime.activations
        acts.boundary.room = None  # four leases throughout (growing them: test_activations_staging.py)
        losses = run_steps(model, opt, STEPS, 1, lambda step, _: data[step])
        runs[name] = losses, offload.state_dict(model), acts.measure
        if name == "auto":
            assert acts.measure is not None and acts.measure.decision is not None
            assert acts.measure.traffic.disk is acts.boundary.clock and not acts.boundary.clock.running
        model.runtime.close()
    assert runs["recompute"][0] == runs["auto"][0] == want  # bitwise
    for key, value in runs["recompute"][1].items():
        assert torch.equal(runs["auto"][1][key], value), key
    measure = runs["auto"][2]
    assert measure is not None and measure.disk is not None
    written, read = measure.disk
    assert written.nbytes == 8 * PADDED and read.nbytes == 4 * PADDED
    assert written.seconds > 0 and read.seconds > 0
    bounds = measure.bounds()
    # The bytes moved over the rate the disk delivered while moving them: its busy seconds.
    assert bounds.disk_forward_s == pytest.approx(written.nbytes / (written.nbytes / written.seconds))
    assert bounds.disk_backward_s == pytest.approx(read.nbytes / (read.nbytes / read.seconds))
    assert (bounds.disk_forward_s, bounds.disk_backward_s) == (written.seconds, read.seconds)


def test_auto_counts_no_disk_for_boundary_states_in_host_memory() -> None:
    model, opt = offload.wrap(
        tiny("llama", layers=3),
        device="cpu",
        dtype="float32",
        placement={"activations": "host", "offload_saved": "auto"},
    )
    acts = model.runtime.activations
    assert acts.measure is not None and acts.measure.traffic.disk is None
    run_steps(model, opt, 3, 1, lambda step, _: batches(3)[step])
    assert acts.measure.decision is not None and acts.measure.disk is None
    bounds = acts.measure.bounds()
    assert bounds.disk_forward_s == bounds.disk_backward_s == 0.0
    model.runtime.close()


def test_closing_the_store_ends_its_clock(disk_dir: Path) -> None:
    """A run that stops inside the measured pass: close() ends the watcher thread."""
    model, opt = wrap({"activations": "nvme", "offload_saved": "auto"}, disk_dir, tiny("llama", layers=3))
    store = model.runtime.activations.boundary
    before = {t for t in threading.enumerate() if t.name == "offload-disk-clock"}
    run_steps(model, opt, 2, 1, lambda step, _: batches(2)[step])  # the second pass is measured
    assert store.clock.running
    watchers = {t for t in threading.enumerate() if t.name == "offload-disk-clock"} - before
    assert len(watchers) == 1
    model.runtime.close()
    assert not store.clock.running and not any(t.is_alive() for t in watchers)
