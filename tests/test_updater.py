"""The optimizer worker's busy clock: the seconds its updates computed, not those they waited.

offload_saved auto reads a step's busy time as the CPU optimizer's bound. An update queued during
backward first waits for its gradient to land on the host; counting that wait would make the
bound as long as the device's backward, and auto would stop keeping blocks where the CPU is in
fact idle. The clock here is a fake one that moves only where the test says.

And its order: of the updates whose gradient has landed, the one the next forward needs first;
when none has, the oldest.
"""

from __future__ import annotations

import threading
import types

import pytest
import torch

import offload.engine.updater as updater_mod
from offload import wrap
from offload.engine.trace import Tracer
from offload.engine.updater import Updater
from tests.models import tiny


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _record(index: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(index=index, version=0, updated=threading.Event())


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(updater_mod.time, "perf_counter", c)
    return c


def test_busy_time_leaves_out_the_waits_for_gradients(clock: Clock) -> None:
    up = Updater(Tracer(None, torch.device("cpu")))
    try:

        def update() -> bool:
            up.idle(lambda: clock.advance(3.0))  # the gradient's copy to the host
            clock.advance(1.0)  # the update itself
            up.idle(lambda: clock.advance(0.5))
            return True

        recs = [_record(i) for i in range(2)]
        for rec in recs:
            up.submit(rec, update, ready=lambda: True)  # type: ignore[arg-type]
        up.wait_all()
        assert up.busy_s == pytest.approx(2.0)
        assert [r.version for r in recs] == [1, 1]
    finally:
        up.close()


def test_a_failed_wait_is_still_idle_and_the_error_reaches_the_caller(clock: Clock) -> None:
    up = Updater(Tracer(None, torch.device("cpu")))
    try:

        def broken_wait() -> None:
            clock.advance(2.0)
            raise OSError("the copy failed")

        def update() -> bool:
            clock.advance(0.25)
            up.idle(broken_wait)
            return True

        rec = _record(0)
        up.submit(rec, update, ready=lambda: True)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="the copy failed"):
            up.wait_all()
        assert rec.updated.is_set() and rec.version == 0
        assert up.busy_s == 0.0  # a failed update's time is not counted at all

        def fine() -> bool:
            clock.advance(0.75)
            return False

        up.submit(rec, fine)  # type: ignore[arg-type]
        up.wait_all()  # the failure was reported once; later updates run as usual
        assert up.busy_s == pytest.approx(0.75)
    finally:
        up.close()


class _Order:
    """An updater whose worker is held at a first update until the test has queued the rest;
    each update appends its record's index to ``ran``."""

    def __init__(self) -> None:
        self.up = Updater(Tracer(None, torch.device("cpu")))
        self.ran: list[int] = []
        self.gate = threading.Event()
        self.up.submit(_record(-99), self._held)  # type: ignore[arg-type]

    def _held(self) -> bool:
        self.gate.wait(10)
        return False

    def add(self, index: int, ready: object = None) -> types.SimpleNamespace:
        rec = _record(index)

        def update() -> bool:
            self.ran.append(index)
            return True

        self.up.submit(rec, update, ready=ready)  # type: ignore[arg-type]
        return rec

    def run(self) -> list[int]:
        self.gate.set()
        self.up.wait_all()
        self.up.close()
        return self.ran


def test_landed_updates_run_in_the_order_the_next_forward_needs() -> None:
    o = _Order()
    for index in (31, 30, 29, -1):  # as backward queues them, the residents last
        o.add(index, ready=lambda: True)
    assert o.run() == [-1, 29, 30, 31]


def test_an_update_whose_gradient_has_not_landed_waits_behind_landed_ones() -> None:
    o = _Order()
    landed = {31: True, 30: True, 29: False}
    for index in (31, 30, 29):
        o.add(index, ready=lambda i=index: landed[i])
    original = o.up._pick

    def pick() -> int | None:  # 29 lands once the worker has taken one other update
        if o.ran:
            landed[29] = True
        return original()

    o.up._pick = pick  # type: ignore[method-assign]
    assert o.run() == [30, 29, 31]


def test_with_nothing_landed_the_oldest_runs_first() -> None:
    o = _Order()
    for index in (12, 11, 10):
        o.add(index, ready=lambda: False)  # its update waits for the gradient itself
    assert o.run() == [12, 11, 10]


def test_the_worker_reads_ahead_the_update_it_will_run_next() -> None:
    o = _Order()
    seen: list[int] = []
    o.up.prefetch = lambda rec: seen.append(rec.index)  # type: ignore[assignment]
    for index in (5, 4, 3):
        o.add(index, ready=lambda: True)
    assert o.run() == [3, 4, 5]
    assert seen[-2:] == [4, 5]  # before 3 it read 4, before 4 it read 5 (the held one may have read 3)


def test_the_warm_up_upload_does_not_wait_for_a_running_update() -> None:
    """At a forward's start the first streamed block's weights are prefetched only if its update
    is done: otherwise the host goes on to launch the device blocks before it, and the block is
    uploaded (after its update) when the one before it has been."""
    model, _ = wrap(tiny("llama"), device="cpu", dtype="float32", placement={"device_blocks": 1})
    ex = model.runtime.executor
    rec = ex.blocks[1]
    s = ex.slot_of[1]
    ex.slots.holds[s] = None  # as after another block used the slot
    rec.updated.clear()  # its update is still running
    ex.prefetch(0, wait=False)
    assert ex.slots.holds[s] is None  # nothing queued, and no wait
    rec.updated.set()
    ex.prefetch(0, wait=False)
    assert ex.slots.holds[s] == (1, rec.version)
