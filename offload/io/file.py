"""DirectFile: a file opened for O_DIRECT transfers through an Engine.

Aligned transfers (address, offset and size multiples of 4096) go straight to the disk. The
unaligned head and tail of a request, or a buffer whose address is misaligned, go through the
page cache on a second descriptor: correct, only slower. Filesystems that refuse O_DIRECT
(tmpfs) raise a clear error unless the file is opened with ``direct=False``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from offload import _C
from offload.io.engine import Engine, default_engine
from offload.io.future import InFlight, IoFuture
from offload.io.request import Read, Write

MODES = ("r", "r+", "w", "x")


class DirectFile:
    """One open file; see the module docstring."""

    def __init__(
        self, path: str | os.PathLike[str], mode: str = "r", direct: bool = True, engine: Engine | None = None
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self.engine = engine or default_engine()
        self.native: Any = _C.File(self.path, mode, direct)
        self.pending = InFlight()  # this file's requests: close() waits for them

    @property
    def direct(self) -> bool:
        return bool(self.native.direct)

    @property
    def closed(self) -> bool:
        return bool(self.native.closed)

    def read_into(self, buf: Any, offset: int = 0, nbytes: int | None = None) -> IoFuture:
        """Reads into buf (the whole buffer unless nbytes is given) from offset."""
        return self.engine.submit([Read(self, buf, offset, nbytes)])[0]

    def write_from(self, buf: Any, offset: int = 0, nbytes: int | None = None) -> IoFuture:
        """Writes buf (the whole buffer unless nbytes is given) at offset."""
        return self.engine.submit([Write(self, buf, offset, nbytes)])[0]

    def size(self) -> int:
        return int(self.native.size())

    def truncate(self, nbytes: int) -> None:
        self.native.truncate(nbytes)

    def allocate(self, nbytes: int) -> None:
        """Reserves nbytes of disk space now, so a full disk fails here rather than mid-write."""
        self.native.allocate(nbytes)

    def sync(self) -> None:
        """fsync: waits for what is in flight, then makes it durable."""
        self.drain()
        self.native.sync()

    def drain(self) -> None:
        """Waits for every request on this file, ignoring their errors (their futures keep them)."""
        for fut in self.pending.take():
            with contextlib.suppress(OSError):
                fut.wait()

    def close(self) -> None:
        # Closing the descriptors under an in-flight request would let it hit a reused fd.
        self.drain()
        self.native.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DirectFile({self.path!r}, mode={self.mode!r}, direct={self.direct})"


def open(
    path: str | os.PathLike[str], mode: str = "r", direct: bool = True, engine: Engine | None = None
) -> DirectFile:
    """Opens path for asynchronous I/O; mode r, r+, w (create/truncate) or x (create, must not exist)."""
    return DirectFile(path, mode, direct, engine)
