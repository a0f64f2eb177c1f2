"""The optimizer's worker thread: applies queued block updates off the training thread.

Which update runs next: of those whose input has landed, the one the next forward needs first
(resident parameters, block 0, 1, ...; earliest deadline first); when none has landed, the
oldest, whose gradient lands first. Updates queued during backward (``submit(..., ready=...)``)
say whether their gradient is on the host yet: the launching thread runs far ahead of the device,
so a block queued later may not have its gradient yet, and waiting for it would idle the worker
while earlier gradients wait. Backward lands the gradients last block first, so when the updates
cannot keep up with backward, what is left at its end is the last blocks, which the next forward
needs last: their updates overlap the forward of the first blocks. Run in arrival order instead,
the blocks left would be the first ones, and the next forward would wait for each (0.1 s of a
2.1 s step at 16K tokens on the 6.7B shape, on the H100). Updates queued at ``step()`` (inputs
all landed) run in forward order.

A record's ``updated`` event is cleared when its update is queued and set when it is done; the
executor waits on it before copying the block's weights, so the device never reads a half-
updated wire copy. An exception in an update is kept and re-raised on the training thread.

Read-ahead: before running an update, the worker passes the record queued next to ``prefetch``
(set by the optimizer), so state kept off RAM can be on its way while this update computes.

Busy time: ``busy_s`` adds up the seconds the worker spent in updates, less those an update
spent waiting for its gradient to land (``idle``): offload_saved auto reads a step's as the CPU
optimizer's bound, which is the CPU's work, not the device's backward it waits on.

Capture fence: while an asynchronous checkpoint is capturing the state as of its ``save()`` call,
``fence`` is set (offload/checkpoint/capture.py). The worker asks it before each update
(``hold``: wait until the record is captured, if the save still needs it as it is) and tells it
after (``finished``: an update the save was waiting for is done).
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from offload.engine.trace import Tracer
from offload.store.record import BlockRecord

Update = Callable[[], bool]  # returns whether the record's weights changed


@dataclass(slots=True)
class _Queued:
    seq: int
    rec: BlockRecord
    update: Update
    ready: Callable[[], bool] | None  # whether its input has landed (None: it has)

    def landed(self) -> bool:
        return self.ready is None or self.ready()


class Fence(Protocol):
    released: threading.Event
    """Set once the fence holds nothing back any more (a later capture waits for it)."""

    def hold(self, rec: BlockRecord) -> None:
        """Blocks until rec may be updated (a checkpoint in flight has captured it)."""

    def finished(self, rec: BlockRecord, ok: bool) -> None:
        """An update of rec has finished (ok: without error)."""


class Updater:
    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._queue: list[_Queued] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending = 0
        self._stop = False
        self.prefetch: Callable[[BlockRecord], None] | None = None
        self.fence: Fence | None = None  # set by a checkpoint while it captures records
        self.busy_s = 0.0  # seconds spent in updates so far, less their waits (see the module)
        self._idle_s = 0.0  # the running update's waits so far

    def submit(self, rec: BlockRecord, update: Update, ready: Callable[[], bool] | None = None) -> None:
        """Queues rec's update; ready says whether its input has landed (None: it has)."""
        if self._thread is None:  # started on first use: importing or wrapping starts no thread
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="offload-optimizer", daemon=True)
            self._thread.start()
            # A thread that ran torch ops must be gone before the interpreter tears torch down
            # (otherwise the process aborts at exit with "terminate called").
            atexit.register(self.close)
        rec.updated.clear()
        with self._cond:
            self._pending += 1
            self._queue.append(_Queued(next(self._seq), rec, update, ready))
            self._cond.notify_all()

    def _pick(self) -> int | None:
        """Position in the queue of the update to run next (see the module); None: empty."""
        q = self._queue
        if not q:
            return None
        landed = [k for k, e in enumerate(q) if e.landed()]
        if landed:
            return min(landed, key=lambda k: (q[k].rec.index, q[k].seq))
        return 0  # the oldest: the queue keeps arrival order (appended, popped from anywhere)

    def _next(self) -> tuple[BlockRecord, Update, BlockRecord | None] | None:
        """The next update, and the record of the one likely to follow it (None: nothing queued)."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._stop)
            k = self._pick()
            if k is None:
                return None
            e = self._queue.pop(k)
            following = self._pick()
            return e.rec, e.update, None if following is None else self._queue[following].rec

    def _run(self) -> None:
        while (item := self._next()) is not None:
            rec, update, following = item
            try:
                if self._error is None:
                    if following is not None and self.prefetch is not None:
                        self.prefetch(following)
                    if (fence := self.fence) is not None:
                        # A checkpoint is capturing the state as of its save(): an update queued
                        # after the save must not change rec before rec is copied out.
                        fence.hold(rec)
                    start, self._idle_s = time.perf_counter(), 0.0
                    with self.tracer.span("adamw", "optimizer", block=rec.index):
                        if update():
                            rec.version += 1
                    self.busy_s += time.perf_counter() - start - self._idle_s
            except BaseException as e:  # re-raised on the training thread by check()
                self._error = e
            finally:
                rec.updated.set()  # waiters wake and find the error, if any
                # Read again: a save may have started while this update ran, and wait for it.
                if (fence := self.fence) is not None:
                    fence.finished(rec, self._error is None)
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def idle(self, wait: Callable[[], object]) -> None:
        """Runs wait() (an update waiting for what it needs, on the worker thread) and leaves
        its seconds out of busy_s."""
        start = time.perf_counter()
        try:
            wait()
        finally:
            self._idle_s += time.perf_counter() - start

    def wait_all(self) -> None:
        """Blocks until every queued update has run, then raises a failed update's error."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)
        self.check()

    def check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the optimizer update failed: {err}") from err

    def close(self) -> None:
        """Finishes the queued updates, then stops the thread."""
        if self._thread is not None:
            with self._cond:
                self._cond.wait_for(lambda: self._pending == 0)
                self._stop = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
