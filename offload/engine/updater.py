"""The optimizer's worker thread: applies queued block updates in order, off the training thread.

A record's ``updated`` event is cleared when its update is queued and set when it is done; the
executor waits on it before copying the block's weights, so the device never reads a half-
updated wire copy. An exception in an update is kept and re-raised on the training thread.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable

from offload.engine.trace import Tracer
from offload.store.record import BlockRecord

Update = Callable[[], bool]  # returns whether the record's weights changed


class Updater:
    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._queue: queue.SimpleQueue[tuple[BlockRecord, Update] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending = 0
        self._idle = threading.Condition()

    def submit(self, rec: BlockRecord, update: Update) -> None:
        if self._thread is None:  # started on first use: importing or wrapping starts no thread
            self._thread = threading.Thread(target=self._run, name="offload-optimizer", daemon=True)
            self._thread.start()
            # A thread that ran torch ops must be gone before the interpreter tears torch down
            # (otherwise the process aborts at exit with "terminate called").
            atexit.register(self.close)
        rec.updated.clear()
        with self._idle:
            self._pending += 1
        self._queue.put((rec, update))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            rec, update = item
            try:
                if self._error is None:
                    with self.tracer.span("adamw", "optimizer", block=rec.index):
                        if update():
                            rec.version += 1
            except BaseException as e:  # re-raised on the training thread by check()
                self._error = e
            finally:
                rec.updated.set()  # waiters wake and find the error, if any
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_all(self) -> None:
        """Blocks until every queued update has run, then raises a failed update's error."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self.check()

    def check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the optimizer update failed: {err}") from err

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
