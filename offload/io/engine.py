"""The I/O engine: one native backend (io_uring or a thread pool) and the futures it serves.

Backend choice: ``backend="auto"`` (the default) takes ``OFFLOAD_IO_BACKEND`` when set, else tries
io_uring and falls back to the thread pool where the kernel refuses it (EPERM from a sandbox or
kernel.io_uring_disabled, ENOSYS from an old kernel). ``fallback_reason`` says why.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from offload import _C
from offload.io.buffers import buffer_ref
from offload.io.future import InFlight, IoFuture
from offload.io.request import Read, Write

BACKENDS = ("io_uring", "threads")
ENV_BACKEND = "OFFLOAD_IO_BACKEND"


def _resolve(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"io backend must be auto, io_uring or threads, got {backend!r}")
    return backend


class Engine:
    """Moves bytes between memory and files asynchronously; see the module docstring."""

    def __init__(
        self,
        backend: str = "auto",
        queue_depth: int = 64,
        chunk_bytes: int = 1 << 20,
        threads: int = 8,
    ) -> None:
        self.requested = _resolve(backend)
        self.fallback_reason: str | None = None
        self._native = self._make(self.requested, queue_depth, chunk_bytes, threads)
        self._lock = threading.Lock()
        self._inflight = InFlight()
        self._closed = False

    @staticmethod
    def _check(queue_depth: int, chunk_bytes: int, threads: int) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be at least 1, got {queue_depth}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if chunk_bytes <= 0 or chunk_bytes % _C.DIRECT_ALIGN:
            raise ValueError(
                f"chunk_bytes must be a positive multiple of {_C.DIRECT_ALIGN}, got {chunk_bytes}"
            )

    def _make(self, backend: str, queue_depth: int, chunk_bytes: int, threads: int) -> Any:
        self._check(queue_depth, chunk_bytes, threads)
        if backend == "threads":
            return _C.make_engine("threads", chunk_bytes, threads)
        try:
            return _C.make_engine("io_uring", chunk_bytes, queue_depth)
        except OSError as e:
            if backend == "io_uring":
                raise OSError(e.errno, f"io_uring backend unavailable: {e.strerror}") from e
            self.fallback_reason = str(e)
            return _C.make_engine("threads", chunk_bytes, threads)

    @property
    def backend(self) -> str:
        return str(self._native.name)

    @property
    def chunk_bytes(self) -> int:
        return int(self._native.chunk_bytes)

    @property
    def queue_depth(self) -> int:
        return int(self._native.queue_depth)

    def register(self, ptr: int, nbytes: int) -> bool:
        """Registers memory (a pool arena) for cheaper transfers; False where unsupported."""
        return bool(self._native.register_buffer(ptr, nbytes))

    def unregister(self, ptr: int) -> None:
        self._native.unregister_buffer(ptr)

    @property
    def registered_bytes(self) -> int:
        return int(self._native.registered_bytes())

    def submit(self, requests: Sequence[Read | Write]) -> list[IoFuture]:
        """Submits a batch at once; one future per request, in order."""
        batch, owners = [], []
        for r in requests:
            is_write = isinstance(r, Write)
            if not is_write and not isinstance(r, Read):
                raise TypeError(f"expected offload.io.Read or Write, got {type(r).__name__}")
            ref = buffer_ref(r.buf)
            nbytes = ref.nbytes if r.nbytes is None else r.nbytes
            if nbytes < 0 or nbytes > ref.nbytes:
                raise ValueError(f"nbytes={nbytes} does not fit the {ref.nbytes}-byte buffer")
            if r.offset < 0:
                raise ValueError(f"offset must be non-negative, got {r.offset}")
            if not is_write and not ref.writable:
                raise ValueError("cannot read into a read-only buffer")
            batch.append((is_write, r.file.native, ref.ptr, nbytes, r.offset))
            owners.append((ref.owner, r.file))
        with self._lock:
            if self._closed:
                raise RuntimeError("io engine is closed")
            native = self._native.submit(batch)
            futures = [IoFuture(req, owner) for req, owner in zip(native, owners)]
            # A future dropped unwaited must still keep its buffer alive until the kernel is
            # done with it, so the engine holds every future until it completes.
            self._inflight.add(futures)
        for fut, r in zip(futures, requests):
            r.file.pending.add([fut])
        return futures

    def close(self) -> None:
        """Finishes every request in flight, then stops the backend."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._native.shutdown()
        self._inflight.take()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine(backend={self.backend!r}, queue_depth={self.queue_depth}, chunk_bytes={self.chunk_bytes})"


_default: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """The process-wide engine, created on first use (never at import)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Engine()
            if _default.fallback_reason:
                warnings.warn(
                    f"io_uring unavailable, using the thread-pool backend: {_default.fallback_reason}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _default
