"""Asynchronous saves: the step captured is the one save() was called at, while training goes on.

A gate stops the writer just before its first capture until the optimizer's worker is waiting in
the capture fence for a record's next update, so every run really has an update held back by the
save (no timing involved). Then: the checkpoint holds exactly the state at the save (bitwise,
float32 on the CPU), training was not perturbed (its losses equal a run without saves), and
resuming from it equals the straight run. Failures (a full disk, EIO, a failed rename) surface on
wait(), leave no checkpoint, keep ``latest`` and release the held updates.
"""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import offload
from offload.checkpoint import capture, list_checkpoints, load, save, staging, verify, writer
from tests.models import batches, tiny
from tests.test_checkpoint import assert_same_state as assert_same
from tests.test_checkpoint import train as train_sched

CLIP = {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5}
OVERLAP = {"lr": 3e-3, "weight_decay": 0.1, "overlap_backward": True}


def make(opt: dict[str, Any], **overrides: Any) -> tuple[Any, Any]:
    return offload.wrap(tiny("llama"), device="cpu", dtype="float32", optimizer=opt, **overrides)


def train(model: Any, opt: Any, data: list[torch.Tensor]) -> list[float]:
    return train_sched(model, opt, None, data)


class Gate:
    """Holds the writer before its first capture until the worker waits in the fence for a record.

    Any record, not a chosen one: which update the worker reaches first depends on timing (with
    overlap_backward, what backward queued and the worker has not started yet runs in forward
    order after step()), and the writer takes the record the worker waits for next."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.worker_held = threading.Event()
        wait_ready, hold = capture.CaptureFence.wait_ready, capture.CaptureFence.hold
        gate = self

        def gated_wait_ready(fence: capture.CaptureFence, rec: Any) -> None:
            assert gate.worker_held.wait(60), "the worker never waited for a capture"
            wait_ready(fence, rec)

        def signalling_hold(fence: capture.CaptureFence, rec: Any) -> None:
            ready, captured = fence._ready.get(id(rec)), fence._captured.get(id(rec))
            if ready is not None and captured is not None and ready.is_set() and not captured.is_set():
                gate.worker_held.set()
            hold(fence, rec)

        monkeypatch.setattr(capture.CaptureFence, "wait_ready", gated_wait_ready)
        monkeypatch.setattr(capture.CaptureFence, "hold", signalling_hold)


PLACEMENTS = {
    "host": (CLIP, {}),
    "overlap": (OVERLAP, {}),
    "device-block-overlap": (OVERLAP, {"placement": {"device_blocks": 1}}),
    "nvme": (CLIP, {"placement": {"optimizer_state": "nvme"}}),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_save_in_flight_captures_its_step(
    name: str, tmp_path: Path, disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opt_cfg, overrides = PLACEMENTS[name]
    if "nvme" in name:
        overrides = {**overrides, "nvme_dirs": [str(disk_dir / "state")]}
    data = batches(6)
    model, opt = make(opt_cfg, **overrides)
    straight = train(model, opt, data[:3])
    at_save = offload.state_dict(model)
    straight += train(model, opt, data[3:])
    expect = offload.state_dict(model)
    model.runtime.close()

    Gate(monkeypatch)
    monkeypatch.setattr(staging, "CHUNK_BYTES", 3 * 4096)  # many chunks per file: the ring wraps
    model, opt = make(opt_cfg, **overrides, trace=str(tmp_path / "trace.json"))
    losses = train(model, opt, data[:3])
    handle = save(model, opt, tmp_path / "ckpt", step=3)
    losses += train(model, opt, data[3:])  # a record's next update waits until the save has it
    assert handle.wait() == tmp_path / "ckpt" / "step_000003"
    assert losses == straight  # the save did not perturb training
    assert_same(offload.state_dict(model), expect)
    stats = handle.stats
    lanes = {(e["name"], e["tid"]) for e in model.runtime.tracer.events()}
    model.runtime.close()
    assert verify(handle.path) == []

    model, opt = make(opt_cfg, **overrides)
    load(model, opt, handle.path)
    assert_same(offload.state_dict(model), at_save)  # not a later step's state, nor a mix
    assert train(model, opt, data[3:]) == straight[3:]
    assert_same(offload.state_dict(model), expect)
    model.runtime.close()
    assert stats.hold_s > 0 and stats.bytes == sum(f.stat().st_size for f in handle.path.iterdir())
    assert 0 < stats.capture_s <= stats.seconds and stats.write_s <= stats.seconds
    assert ("wait_capture", 4) in lanes and ("checkpoint", 6) in lanes  # optimizer and io lanes


class FakeRecord:
    def __init__(self, index: int, pending: bool) -> None:
        self.index, self.name = index, f"block.{index}"
        self.updated = threading.Event()
        if not pending:
            self.updated.set()


class FakeUpdater:
    fence: Any = None


class FakeRuntime:
    def __init__(self) -> None:
        self.updater = FakeUpdater()


def test_writer_takes_the_record_the_worker_waits_for() -> None:
    """next_ready: the record the worker waits for first, else the first in the writer's order
    once the updates from before the save have all run (a copy does not race them); it waits
    until then and raises when the update it waits for failed."""
    from offload.engine.trace import Tracer

    tracer = Tracer(None, torch.device("cpu"))
    recs: list[Any] = [FakeRecord(i, pending=i in (0, 1)) for i in range(4)]
    fence = capture.CaptureFence(recs, tracer)
    fence.install(FakeRuntime(), recs)  # type: ignore[arg-type]
    order = [recs[3], recs[2], recs[1], recs[0]]  # the writer's guess: last block first
    assert fence.next_ready(order, wait=False) is None  # blocks 0 and 1 are still being updated
    assert fence.next_ready(order[:2]) is recs[3]  # of these two, nothing runs: the first
    fence.finished(recs[0], ok=True)  # block 0's update from before the save has run
    assert fence.next_ready(order, wait=False) is None  # block 1's still runs
    held = threading.Thread(target=fence.hold, args=(recs[0],))  # its next one waits for the save
    held.start()
    while fence._waiting is None:
        time.sleep(0.001)
    assert fence.next_ready(order) is recs[0]  # the worker waits for it: taken first
    fence.captured(recs[0])
    held.join(10)
    assert not held.is_alive() and fence.hold_s > 0

    assert fence.next_ready([recs[1]], wait=False) is None  # its update from before has not run
    got: list[Any] = []
    taker = threading.Thread(target=lambda: got.append(fence.next_ready([recs[1]])))
    taker.start()
    taker.join(0.05)
    assert taker.is_alive() and got == []  # block 1's update from before the save has not run
    fence.finished(recs[1], ok=True)
    taker.join(10)
    assert got == [recs[1]]

    bad: Any = FakeRecord(8, pending=True)
    failing = capture.CaptureFence([bad], tracer)
    failing.install(FakeRuntime(), [bad])  # type: ignore[arg-type]
    failing.finished(bad, ok=False)
    with pytest.raises(RuntimeError, match=r"optimizer update of block\.8 failed"):
        failing.next_ready([bad])


def test_second_save_waits_for_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Gate(monkeypatch)
    model, opt = make(CLIP)
    data = batches(2)
    train(model, opt, data[:1])
    first = save(model, opt, tmp_path, step=1)
    with pytest.raises(RuntimeError, match="still in flight: wait"):
        first.stats  # noqa: B018
    with pytest.raises(TimeoutError, match=r"still in flight after 0\.01 s"):
        first.wait(timeout=0.01)
    # The second step's first update waits for the first save, which the gate lets go once it
    # does; the second save() returns only after the first has committed.
    train(model, opt, data[1:])
    second = save(model, opt, tmp_path, step=2)
    assert first.done() and first.wait() == tmp_path / "step_000001"
    assert second.wait() == tmp_path / "step_000002"
    assert second.stats.waited_s <= second.stats.call_s
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    model.runtime.close()


class FailedWrite:
    """An io future whose write failed with EIO."""

    def wait(self, timeout: float | None = None) -> int:
        raise OSError(errno.EIO, "Input/output error (injected)")


def fail_allocate(monkeypatch: pytest.MonkeyPatch) -> None:
    real = offload.io.DirectFile.allocate

    def allocate(f: Any, nbytes: int) -> None:
        if f.path.endswith("block.1.safetensors"):
            raise OSError(errno.ENOSPC, f"No space left on device (injected): {f.path}")
        real(f, nbytes)

    monkeypatch.setattr(offload.io.DirectFile, "allocate", allocate)


def fail_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = offload.io.DirectFile.write_from

    def write_from(f: Any, buf: Any, offset: int = 0, nbytes: int | None = None) -> Any:
        if f.path.endswith("block.2.safetensors"):
            return FailedWrite()
        return real(f, buf, offset, nbytes)

    monkeypatch.setattr(offload.io.DirectFile, "write_from", write_from)


def fail_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def rename(a: Any, b: Any) -> None:
        raise OSError(errno.EIO, "Input/output error (injected rename)")

    monkeypatch.setattr(writer.os, "rename", rename)


@pytest.mark.parametrize(
    ("inject", "code"), [(fail_allocate, errno.ENOSPC), (fail_write, errno.EIO), (fail_rename, errno.EIO)]
)
def test_failed_save_surfaces_on_wait_and_leaves_no_checkpoint(
    inject: Any, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = make(CLIP)
    data = batches(4)
    train(model, opt, data[:1])
    save(model, opt, tmp_path, step=1).wait()
    train(model, opt, data[1:2])
    with monkeypatch.context() as m:
        inject(m)
        handle = save(model, opt, tmp_path, step=2)
        train(model, opt, data[2:3])  # held updates are released when the save fails
        with pytest.raises(OSError, match="injected") as raised:
            handle.wait()
    assert raised.value.errno == code
    assert handle.stats.step == 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "latest").read_text() == "step_000001\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the failed save cleaned up
    train(model, opt, data[3:])
    assert save(model, opt, tmp_path, step=4).wait() == tmp_path / "step_000004"  # and saving works again
    model.runtime.close()


def test_staging_bytes_must_be_positive(tmp_path: Path) -> None:
    model, opt = make(CLIP)
    with pytest.raises(ValueError, match="staging_bytes = 0"):
        save(model, opt, tmp_path, step=1, staging_bytes=0)
    model.runtime.close()
