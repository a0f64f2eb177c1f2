"""Staging: the pinned chunks checkpoint bytes pass through on their way to disk, and one
safetensors file streamed through them.

A record is copied chunk by chunk into a ring of 4096-aligned pool leases, and each full chunk is
written with O_DIRECT (``offload.io``) at the next file offset, a multiple of the chunk size, so
every write but a file's last partial chunk goes direct. The copy into staging is what *captures*
a record (after it the optimizer may change it again); the ring bounds how far capture runs ahead
of the disk: when every chunk is in flight, taking one waits for the oldest write. A ring that
holds every host record lets capture run at memory speed, and then the copy itself is what the
optimizer may wait for: host bytes are copied on COPY_THREADS threads (numpy releases the GIL),
the writer thread taking one part.

Each tensor's crc32 is summed over the staged bytes, the very bytes that are written. Host bytes
are summed as they are copied (``offload._C.copy_crc32``: a block is copied, then summed while it
is still in cache, so the chunk is not read from memory a second time, and no Python runs between
the blocks); bytes from the device, once they landed, on a few threads (``offload._C.crc32``,
without the GIL): every slice of CRC_SLICE bytes on its own. Both fold with PCLMULQDQ where the
CPU has it (about 10 GB/s a core against zlib's 3). The pieces' sums are combined in order when the file
is done (``offload.utils.crc``), so neither the writer thread nor one tensor's pieces waiting for
each other cap the throughput.

Files are written whole and never read back: the safetensors header (8-byte little-endian
length, JSON, padded with spaces to 8 bytes) is computed up front from the shapes.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from offload import _C
from offload import io as oio
from offload._version import __version__
from offload.memory import PinnedPool
from offload.memory.arena import Lease
from offload.utils import crc
from offload.utils.priority import lower_thread_priority

CHUNK_BYTES = 64 << 20  # bytes per staging chunk (and per write request)
ALIGN = 4096  # O_DIRECT's alignment; chunk sizes are multiples of it
CRC_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
CRC_SLICE = 64 << 20  # bytes summed by one crc32 call at most (a chunk: few wake-ups, each ~20 ms)
COPY_THREADS = CRC_THREADS  # threads copying host bytes into staging (the writer thread is one)
COPY_SLICE = 8 << 20  # bytes per thread at least: smaller copies stay on the writer thread

Pending = Union[oio.IoFuture, "Future[int]"]  # what reads a chunk: its write, its crc32 sums
Summed = Union[int, "Future[int]"]  # a piece's crc32: summed while copied, or on a crc32 thread

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_header(
    items: Sequence[tuple[str, torch.dtype, Sequence[int]]],
) -> tuple[bytes, dict[str, Any]]:
    """The header bytes of a safetensors file holding items (key, dtype, shape) in this order, and
    per key {dtype, shape, offset, nbytes} (offset: from the start of the file)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": f"offload {__version__}"}}
    begin = 0
    spans = []
    for key, dtype, shape in items:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= int(d)
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [begin, begin + nbytes],
        }
        spans.append((key, begin, nbytes))
        begin += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors spec asks
    start = 8 + len(raw)
    index = {
        key: {"dtype": header[key]["dtype"], "shape": header[key]["shape"], "offset": start + b, "nbytes": n}
        for key, b, n in spans
    }
    return struct.pack("<Q", len(raw)) + raw, index


@dataclass(slots=True)
class Tally:
    """Where the writer thread's time went, summed over the saves that used a ring (a save reports
    the difference between its end and its start)."""

    copy_s: float = 0.0
    """Copying into staging: host memcpy, and waiting for device-to-host copies to land."""
    write_wait_s: float = 0.0
    """Waiting for a chunk's write before refilling it, or for every write before the commit."""
    crc_wait_s: float = 0.0
    """Waiting for a chunk's crc32 sums after its write was done."""

    def since(self, start: Tally) -> Tally:
        return Tally(
            self.copy_s - start.copy_s,
            self.write_wait_s - start.write_wait_s,
            self.crc_wait_s - start.crc_wait_s,
        )


def chunk_size(largest_file: int) -> int:
    """CHUNK_BYTES, or less for small files: the largest file rounded up to ALIGN."""
    return min(CHUNK_BYTES, max(ALIGN, -(-largest_file // ALIGN) * ALIGN))


class Staging:
    """A ring of ``chunks`` pinned leases of ``chunk_bytes``, the I/O engine that writes them and
    the threads that sum their crc32s. Made once per runtime and reused by its saves; one save
    uses it at a time."""

    def __init__(self, chunk_bytes: int, chunks: int, pin: bool) -> None:
        if chunk_bytes % ALIGN or chunks < 1:
            raise ValueError(
                f"chunk_bytes = {chunk_bytes}, chunks = {chunks}: need a multiple of {ALIGN}, >= 1"
            )
        self.chunk_bytes = chunk_bytes
        self.chunks = chunks
        self.engine = oio.Engine()
        self.pool = PinnedPool(chunk_bytes * chunks, arena_bytes=chunk_bytes, pin=pin, name="checkpoint")
        self.pool.attach_io(self.engine)  # registered buffers where io_uring takes them
        # Background threads (offload.utils.priority): they give way to training's.
        self.crc = ThreadPoolExecutor(
            CRC_THREADS, thread_name_prefix="offload-crc32", initializer=lower_thread_priority
        )
        self.copier = (
            ThreadPoolExecutor(
                COPY_THREADS - 1, thread_name_prefix="offload-ckpt-copy", initializer=lower_thread_priority
            )
            if COPY_THREADS > 1
            else None
        )
        self.tally = Tally()
        self._ring: deque[tuple[Lease, list[Pending]]] = deque(
            (self.pool.lease(chunk_bytes, purpose="checkpoint staging"), []) for _ in range(chunks)
        )

    @property
    def nbytes(self) -> int:
        return self.chunk_bytes * self.chunks

    def take(self) -> Lease:
        """The least recently written chunk, once nothing reads it any more (raises the error of
        its write)."""
        lease, pending = self._ring.popleft()
        try:
            self._settle(pending)  # host wait: a chunk is refilled only after its write and crc32 read it
        except BaseException:
            self._ring.appendleft((lease, []))
            raise
        return lease

    def copy(self, dst: np.ndarray, src: np.ndarray) -> list[tuple[int, int]]:
        """dst[:] = src (host bytes, flat uint8), split over the copy threads when large enough;
        returns when all of it is copied, with the crc32 and length of each part, in order."""

        def part(i: int, n: int) -> tuple[int, int]:
            return _C.copy_crc32(dst.ctypes.data + i, src.ctypes.data + i, n), n

        if not (dst.flags.c_contiguous and src.flags.c_contiguous) or dst.size != src.size:
            np.copyto(dst, src)  # raises for a size mismatch, as a plain copy would
            return [(crc.update(np.ascontiguousarray(dst)), dst.size)]
        size = src.size
        parts = min(COPY_THREADS, size // COPY_SLICE)
        if parts < 2 or self.copier is None:
            return [part(0, size)]
        step = -(-size // parts)
        rest = [self.copier.submit(part, i, min(step, size - i)) for i in range(step, size, step)]
        return [part(0, step)] + [f.result() for f in rest]

    def give(self, lease: Lease, pending: list[Pending]) -> None:
        """Puts a chunk back with what is still reading it (its write, its crc32 sums)."""
        self._ring.append((lease, pending))

    def drain(self, raise_errors: bool = True) -> None:
        """Waits until nothing reads any chunk; raises the first error unless told not to."""
        errors: list[BaseException] = []
        for i, (lease, pending) in enumerate(self._ring):
            try:
                self._settle(pending)
            except Exception as e:
                errors.append(e)
            self._ring[i] = (lease, [])
        if errors and raise_errors:
            raise errors[0]

    def close(self) -> None:
        self.drain(raise_errors=False)
        self.crc.shutdown()
        if self.copier is not None:
            self.copier.shutdown()
        for lease, _ in self._ring:
            lease.release()
        self._ring.clear()
        self.pool.detach_io(self.engine)
        self.pool.close()
        self.engine.close()

    def _settle(self, pending: list[Pending]) -> None:
        """Waits for each (all of them, even after one failed), then raises the first error; the
        waits are tallied (the write comes first in pending, then the crc32 sums)."""
        error: BaseException | None = None
        for p in pending:
            t = time.perf_counter()
            try:
                p.result() if isinstance(p, Future) else p.wait()
            except Exception as e:
                error = error or e
            if isinstance(p, Future):
                self.tally.crc_wait_s += time.perf_counter() - t
            else:
                self.tally.write_wait_s += time.perf_counter() - t
        if error is not None:
            raise error


class FileStream:
    """Streams one safetensors file through the staging ring: ``put`` the header, then each
    tensor (flat bytes, in header order), then ``finish``; ``crcs()`` once the file is done.
    Device tensors are copied on ``stream`` (a CUDA stream, or None on the CPU)."""

    def __init__(self, staging: Staging, file: oio.DirectFile, stream: Any = None) -> None:
        self.staging = staging
        self.file = file
        self.stream = stream
        self.bytes = 0
        self._crc: dict[str, list[tuple[Summed, int]]] = {}  # per tensor: (crc32, length) per piece
        self._chunk: Lease | None = None
        self._used = 0
        self._pieces: list[tuple[str | None, int, int]] = []  # (key, begin, end) in the chunk, to sum

    def put(self, key: str | None, data: torch.Tensor) -> None:
        """Appends data (a flat uint8 tensor, CPU or CUDA) to the file; key: the tensor whose
        crc32 it counts towards (None: the header)."""
        if key is not None:
            self._crc.setdefault(key, [])
        n, at = data.numel(), 0
        while at < n:
            if self._chunk is None:
                self._chunk = self.staging.take()
                self._used = 0
            k = min(n - at, self.staging.chunk_bytes - self._used)
            dst = self._chunk.tensor[self._used : self._used + k]
            t = time.perf_counter()
            if data.is_cuda:
                with torch.cuda.stream(self.stream):  # waited for in _write
                    dst.copy_(data[at : at + k], non_blocking=True)
            else:  # our own threads: torch's copy would take every core from the optimizer
                sums = self.staging.copy(dst.numpy(), data[at : at + k].numpy())
                if key is not None:
                    self._crc[key].extend(sums)
            self.staging.tally.copy_s += time.perf_counter() - t
            if data.is_cuda:  # summed once it landed (_write)
                self._pieces.append((key, self._used, self._used + k))
            self._used += k
            at += k
            if self._used == self.staging.chunk_bytes:
                self._write()

    def finish(self) -> None:
        """Writes the last partial chunk (the file's writes may still be in flight)."""
        if self._chunk is not None:
            self._write()

    def crcs(self) -> dict[str, int]:
        """Each tensor's crc32 (waits for the sums still running)."""
        return {
            k: crc.join([(c if isinstance(c, int) else c.result(), n) for c, n in parts])
            for k, parts in self._crc.items()
        }

    def _write(self) -> None:
        chunk = self._chunk
        assert chunk is not None
        if self.stream is not None:
            # Host wait: the chunk's device-to-host copies must land before crc32 reads the
            # chunk and the write sends it.
            t = time.perf_counter()
            self.stream.synchronize()
            self.staging.tally.copy_s += time.perf_counter() - t
        buf = chunk.tensor.numpy()
        pending: list[Pending] = [self.file.write_from(chunk, self.bytes, self._used)]
        for key, b, e in self._pieces:
            if key is None:
                continue
            for at in range(b, e, CRC_SLICE):
                n = min(CRC_SLICE, e - at)
                summed = self.staging.crc.submit(_C.crc32, buf.ctypes.data + at, n)
                self._crc[key].append((summed, n))
                pending.append(summed)
        self.staging.give(chunk, pending)
        self.bytes += self._used
        self._chunk, self._used, self._pieces = None, 0, []

    def abandon(self) -> None:
        """Gives a chunk being filled back unwritten (the save failed)."""
        if self._chunk is not None:
            self.staging.give(self._chunk, [])
            self._chunk = None
