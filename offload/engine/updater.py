"""The optimizer's worker thread: applies queued block updates off the training thread.

Updates queued during backward (``fifo=True``) run in arrival order, which is the order their
gradients land on the host (the launching thread runs far ahead of the device, so a later block's
gradient may not have landed yet). ``reorder()``, called by optimizer.step(), puts what is still
pending into the order the next forward needs it (resident parameters, block 0, 1, ...); so do
updates queued at step() itself. First-in-first-out there would make the next forward wait for
every update, since backward queues them last block first.

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
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol

from offload.engine.trace import Tracer
from offload.store.record import BlockRecord

Update = Callable[[], bool]  # returns whether the record's weights changed
_FIFO = -(1 << 62)  # rank of updates run in arrival order (ahead of any block index)


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
        self._heap: list[tuple[int, int, BlockRecord, Update]] = []  # (rank, seq, record, update)
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

    def submit(self, rec: BlockRecord, update: Update, fifo: bool = False) -> None:
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
            rank = _FIFO if fifo else rec.index
            heapq.heappush(self._heap, (rank, next(self._seq), rec, update))
            self._cond.notify_all()

    def reorder(self) -> None:
        """Runs what is pending in forward order from now on."""
        with self._cond:
            self._heap = [(rec.index, seq, rec, upd) for _, seq, rec, upd in self._heap]
            heapq.heapify(self._heap)

    def _next(self) -> tuple[BlockRecord, Update, BlockRecord | None] | None:
        """The next update, and the record of the one queued after it (None: nothing queued)."""
        with self._cond:
            self._cond.wait_for(lambda: self._heap or self._stop)
            if not self._heap:
                return None
            _, _, rec, update = heapq.heappop(self._heap)
            return rec, update, self._heap[0][2] if self._heap else None

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
