"""IoFuture: the handle of one read or write in flight."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Any


class IoFuture:
    """Completes when every byte of the request has moved or one chunk of it failed.

    ``wait()`` returns the bytes moved, or raises the OSError of the failure carrying the errno,
    the path, and how far the request got (so a full disk says how much was written).
    """

    __slots__ = ("_owner", "_req")

    def __init__(self, req: Any, owner: Any) -> None:
        self._req = req
        self._owner = owner  # the buffer must outlive the I/O

    def done(self) -> bool:
        return bool(self._req.done())

    def wait(self, timeout: float | None = None) -> int:
        if not self._req.wait(-1.0 if timeout is None else float(timeout)):
            raise TimeoutError(f"I/O on {self._req.path} not finished after {timeout} s")
        self._owner = None
        err = self._req.error
        if err != 0:
            raise self._error(err)
        return int(self._req.bytes_done)

    def exception(self) -> OSError | None:
        """The error of a finished request, or None; does not block."""
        if not self.done() or self._req.error == 0:
            return None
        return self._error(self._req.error)

    @property
    def path(self) -> str:
        return str(self._req.path)

    @property
    def nbytes(self) -> int:
        return int(self._req.nbytes)

    def _error(self, err: int) -> OSError:
        r = self._req
        kind = "write" if r.is_write else "read"
        moved = "wrote" if r.is_write else "read"
        where = f"{r.nbytes} bytes at offset {r.offset}: {moved} {r.bytes_done} of {r.nbytes} bytes"
        if err < 0:  # the engine's end-of-file marker
            return OSError(errno.ENODATA, f"read past end of file: {where}", r.path)
        hint = ""
        if err in (errno.ENOSPC, errno.EDQUOT):
            hint = " (the disk is full)"
        elif err == errno.EFBIG:
            hint = " (file size limit reached)"
        return OSError(err, f"{os.strerror(err)}{hint} during {kind} of {where}", r.path)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"IoFuture({self._req.path!r}, {self._req.nbytes} bytes, {state})"


def wait_all(futures: Iterable[IoFuture], timeout: float | None = None) -> list[int]:
    """Waits for every future (all of them, even after one fails), then raises the first error."""
    results: list[int] = []
    first: BaseException | None = None
    for fut in futures:
        try:
            results.append(fut.wait(timeout))
        except OSError as e:
            first = first or e
            results.append(-1)
    if first is not None:
        raise first
    return results


class InFlight:
    """Futures not yet known to be done, held so their buffers outlive the I/O. Finished ones
    are dropped whenever the list has doubled since the last sweep (amortised O(1) per add)."""

    __slots__ = ("_futures", "_sweep_at")

    def __init__(self) -> None:
        self._futures: list[IoFuture] = []
        self._sweep_at = 64

    def add(self, futures: Iterable[IoFuture]) -> None:
        self._futures.extend(futures)
        if len(self._futures) >= self._sweep_at:
            self._futures = [f for f in self._futures if not f.done()]
            self._sweep_at = max(64, 2 * len(self._futures))

    def take(self) -> list[IoFuture]:
        """Every future still held; the collection is empty afterwards."""
        futures, self._futures = self._futures, []
        return futures
