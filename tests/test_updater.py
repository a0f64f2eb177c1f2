"""The optimizer worker's busy clock: the seconds its updates computed, not those they waited.

offload_saved auto reads a step's busy time as the CPU optimizer's bound. An update queued during
backward first waits for its gradient to land on the host; counting that wait would make the
bound as long as the device's backward, and auto would stop keeping blocks where the CPU is in
fact idle. The clock here is a fake one that moves only where the test says.
"""

from __future__ import annotations

import threading
import types

import pytest
import torch

import offload.engine.updater as updater_mod
from offload.engine.trace import Tracer
from offload.engine.updater import Updater


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
            up.submit(rec, update, fifo=True)  # type: ignore[arg-type]
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
        up.submit(rec, update, fifo=True)  # type: ignore[arg-type]
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
