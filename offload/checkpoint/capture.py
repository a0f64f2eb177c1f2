"""Capturing a consistent step for an asynchronous save (after DataStates-LLM).

Between two optimizer updates a record's state does not change, so a checkpoint taken at a step
boundary need not stop training: it only has to copy each record out before that record's next
update. Two kinds of record:

- **Host records** (streamed blocks, residents kept on the host) are updated on the optimizer's
  worker thread. ``CaptureFence`` is installed on the Updater at ``save()``: an update queued
  before the save (this step's, perhaps still pending) runs freely, and the save waits for it
  (``wait_ready``); an update queued after the save waits in ``hold`` until the record is
  captured. The time the worker waits there is the save's *hold* time, a stall it may pass on to
  training (the next forward waits for a block's update before copying it).
- **Device records** (``placement.device_blocks``, residents on the device) are updated by
  kernels on the compute stream from inside ``optimizer.step()``, where no fence reaches; they
  are snapshotted at ``save()`` by copies queued on the compute stream, which orders them after
  this step's updates and before the next ones. The copy goes to spare device memory when there
  is room (fast; written out and freed by the save), else to host memory (synchronous).

Which update is "before the save": at ``install`` a record whose ``updated`` event is set has no
update pending, so its state is the save's at once; otherwise its pending update is the last one
before the save, and ``finished`` marks it ready. The training loop cannot queue a record's next
update before the pending one has run (the next forward waits for it), so an update held in
``hold`` is always one queued after the save.

Which record to capture next (``next_ready``): the one the worker is waiting for, if any, else,
once every record left has its state as of the save, the first of the writer's order. The
writer does not copy host records while updates from before the save still run: both are bound
by host memory bandwidth, and a copy racing the optimizer slows the update the next forward
waits for (on the 3.4B run with 40 micro-batches a step, the updates took twice as long and the
steps a save was written in 7% longer; the next updates are a whole step away). The writer's order guesses the order of
the next updates, but the worker's real order changes under a save: it runs the landed update
the next forward needs first (``offload/engine/updater.py``), so what a held-back worker has
queued runs in forward order. Following the worker, the next forward gets block 0 first instead
of last.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from offload.engine.runtime import Runtime
from offload.engine.trace import Tracer
from offload.store.record import BlockRecord

DEVICE_MARGIN = 1 << 30  # device bytes left free when snapshotting on the device, beyond the reserve


class CaptureFence:
    """The records a save still has to copy out, and the worker's wait for them."""

    def __init__(self, records: list[BlockRecord], tracer: Tracer) -> None:
        self.tracer = tracer
        self._ready = {id(r): threading.Event() for r in records}  # its state is the save's
        self._captured = {id(r): threading.Event() for r in records}  # copied out: may change
        self._failed: str | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a record became ready, or the worker waits
        self._waiting: int | None = None  # id of the record the worker waits for in hold()
        self.hold_s = 0.0  # seconds the worker waited in hold()
        self.ready_wait_s = 0.0  # seconds the writer waited for updates from before the save
        self.captured_at: float | None = None  # perf_counter() when the last record was captured
        self.released = threading.Event()  # every record captured, or the capture failed

    def install(self, rt: Runtime, records: list[BlockRecord]) -> None:
        """Called by save() on the training thread, before any later update can be queued. The
        optimizer has one fence slot: a capture still in it (a lazy snapshot's) is waited for
        first, so that its records are not updated before it copies them."""
        other = rt.updater.fence
        if other is not None and other is not self:
            with self.tracer.span("wait_other_capture", "host"):
                other.released.wait()
        rt.updater.fence = self
        for rec in records:  # after installing: an update finishing now reports to finished()
            if rec.updated.is_set():
                self._ready[id(rec)].set()

    def hold(self, rec: BlockRecord) -> None:
        """Worker thread, before an update of rec: waits while the save still needs rec as it is."""
        captured = self._captured.get(id(rec))
        if captured is None or captured.is_set() or not self._ready[id(rec)].is_set():
            return  # not saved, already copied out, or the update the save is waiting for
        start = time.perf_counter()
        with self.tracer.span("wait_capture", "optimizer", block=rec.index):
            with self._changed:
                self._waiting = id(rec)
                self._changed.notify_all()  # the writer may take rec next (next_ready)
            captured.wait()
        with self._lock:
            self._waiting = None
            self.hold_s += time.perf_counter() - start

    def finished(self, rec: BlockRecord, ok: bool) -> None:
        """Worker thread, after an update of rec."""
        ready = self._ready.get(id(rec))
        if ready is None or ready.is_set():
            return
        if not ok:
            self._failed = f"the optimizer update of {rec.name} failed before the checkpoint captured it"
        with self._changed:
            ready.set()
            self._changed.notify_all()

    def next_ready(self, records: list[BlockRecord], wait: bool = True) -> BlockRecord | None:
        """Writer thread: of records (not captured yet, in the writer's order), the one the worker
        waits for, else the first once all of them hold the save's state (their updates from
        before the save have run); waits until there is one (None at once when there is none
        and not wait)."""
        start = time.perf_counter()
        with self._changed:
            try:
                while True:
                    if self._failed is not None:
                        raise RuntimeError(self._failed)
                    for rec in records:
                        if id(rec) == self._waiting:  # waiting in hold(): its state is the save's
                            return rec
                    if records and all(self._ready[id(rec)].is_set() for rec in records):
                        return records[0]
                    if not wait:
                        return None
                    self._changed.wait()
            finally:
                self.ready_wait_s += time.perf_counter() - start

    def wait_ready(self, rec: BlockRecord) -> None:
        """Writer thread: until rec holds the state as of the save."""
        start = time.perf_counter()
        self._ready[id(rec)].wait()
        self.ready_wait_s += time.perf_counter() - start
        if self._failed is not None:
            raise RuntimeError(self._failed)

    def captured(self, rec: BlockRecord) -> None:
        """Writer thread: rec is copied out; its next update may run."""
        self._captured[id(rec)].set()
        self.captured_at = time.perf_counter()

    def release(self, rt: Runtime) -> None:
        """Every record captured, or the save failed: nothing waits on this save any more."""
        if rt.updater.fence is self:
            rt.updater.fence = None
        with self._changed:
            for ev in (*self._ready.values(), *self._captured.values()):
                ev.set()
            self._changed.notify_all()
        self.released.set()


@dataclass(slots=True)
class Snapshot:
    """A device record's state as of save(): copies of master, m, v and the step count."""

    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor
    ready: Any  # CUDA event recorded after the copies (None: they are done)


def snapshot(rt: Runtime, records: list[BlockRecord], reserve: int) -> tuple[dict[int, Snapshot], str]:
    """Copies of the device records' state (by id of the record), and where they went: "device"
    (spare device memory, leaving ``reserve`` bytes free for the steps that run while the save is
    written), "host", or "none" (no device records)."""
    if not records:
        return {}, "none"
    dev = rt.device
    room = _device_room(dev.torch) - reserve - DEVICE_MARGIN if dev.cuda else 0
    # reserve 0: no step has run yet, so what one needs is unknown: the host it is.
    where = "device" if reserve > 0 and room > snapshot_bytes(records) else "host"
    copies = {}
    for rec in records:
        tier = rt.tier_of(rec)
        master, m, v = tier.acquire(rec)
        try:
            # On the caller's current (compute) stream: after this step's update kernels, before
            # the next step's. A copy to the host is synchronous.
            copies[id(rec)] = [
                t.clone() if where == "device" or not dev.cuda else t.to("cpu")
                for t in (master, m, v, rec.step)
            ]
        finally:
            tier.release(rec)
    ready = dev.event(dev.compute_stream()) if where == "device" else None
    return {k: Snapshot(m_, a, v_, st, ready) for k, (m_, a, v_, st) in copies.items()}, where


def snapshot_bytes(records: list[BlockRecord]) -> int:
    """Bytes a snapshot of records takes: master, m and v in fp32, and the step count."""
    return sum(3 * r.numel * 4 + 4 for r in records)


def step_reserve(device: Any) -> int:
    """Device memory a training step takes beyond what lives between steps (activations,
    workspaces): its peak so far minus what is allocated now, at a step boundary. A snapshot
    alive during a step raises the peak too: the caller takes it off (see writer.py)."""
    if device.type != "cuda":
        return 0
    return max(0, torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device))


def _device_room(device: torch.device) -> int:
    """Device bytes a snapshot may take: free memory plus what the caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
