"""crc32 (zlib's) of a concatenation from its parts' crc32s, and of large buffers on threads.

``zlib.crc32`` runs at a few GB/s on one core, slower than the copies it checks: a checkpoint's
staging ring sums each slice of a tensor on its own thread, a snapshot sums its chunks (with
k = 1, the rank's whole state) in pieces on a thread pool, and the pieces' crc32s are joined in
order. Python's zlib has no ``crc32_combine``; ``combine`` computes it from the algebra of the
CRC: the crc32 of ``a + b`` is crc32(a) times x^(8 len(b)) modulo the CRC-32 polynomial in GF(2),
plus crc32(b), with the bits reflected as zlib keeps them (bit 31 is x^0). x^(8 n) is cached per
length (most slices have one of a few). Bit for bit ``zlib.crc32`` of the whole; no torch here
(the snapshot keeper reads checksums too). ``update`` sums one buffer on one thread with the
native core's crc32 (PCLMULQDQ folding, about 3x zlib) where it is built, else with zlib.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

try:
    from offload import _C as _native
except ImportError:  # a source tree whose native core is not built: zlib's code does it all
    _native = None

PIECE = 64 << 20
"""Bytes each thread of ``crc32`` sums at a time."""
POLY = 0xEDB88320  # CRC-32 (IEEE 802.3, zlib's), bits reflected
_ONE = 1 << 31  # x^0, reflected
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _mul(a: int, b: int) -> int:
    """a * b modulo the polynomial (both reflected)."""
    product = 0
    for bit in range(31, -1, -1):
        if a & (1 << bit):
            product ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1  # b * x
    return product


@lru_cache(maxsize=256)
def _x8n(nbytes: int) -> int:
    """x^(8 nbytes) modulo the polynomial, by squaring."""
    result, square, e = _ONE, _ONE >> 1, 8 * nbytes  # x^0, x^1
    while e:
        if e & 1:
            result = _mul(result, square)
        square = _mul(square, square)
        e >>= 1
    return result


def combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b)."""
    if len2 < 0:
        raise ValueError(f"len2 = {len2}: must be >= 0")
    return _mul(_x8n(len2), crc1) ^ crc2


def join(parts: list[tuple[int, int]]) -> int:
    """zlib.crc32 of the concatenation of parts given as (crc32, length), in order."""
    crc = 0
    for c, n in parts:
        crc = combine(crc, c, n)
    return crc


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="offload-crc32")
        return _executor


NATIVE_MIN = 4096
"""Bytes from which ``update`` calls the native core (below, zlib's call costs less)."""


def update(data: Any, value: int = 0) -> int:
    """zlib.crc32(data, value) on one thread, by the native core where it is built
    (``offload._C.crc32``: PCLMULQDQ folding where the CPU has it, about 3x zlib; without the GIL).
    data: a C-contiguous buffer."""
    view = memoryview(data).cast("B")
    if _native is None or len(view) < NATIVE_MIN:
        return zlib.crc32(view, value)
    arr = np.frombuffer(view, dtype=np.uint8)
    return int(_native.crc32(arr.ctypes.data, arr.size, value))


def crc32(data: Any, value: int = 0) -> int:
    """zlib.crc32(data, value), summed in ``PIECE``s on a few threads when data is large (the
    native core and zlib let go of the GIL)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n <= 2 * PIECE:
        return update(view, value)
    bounds = list(range(0, n, PIECE))
    sums = list(_pool().map(lambda lo: update(view[lo : lo + PIECE]), bounds))
    return combine(value, join([(s, min(PIECE, n - lo)) for lo, s in zip(bounds, sums)]), n)
