"""crc32 (zlib's) of large buffers on several threads, the pieces' sums joined into the whole's.

A snapshot chunk can be the whole of a rank's state (41 GB for a 3.4B model with k = 1): one
``zlib.crc32`` pass over it runs at a few GB/s on one core, slower than the copy it checks. Here
the buffer is cut into pieces summed on a thread pool (zlib lets go of the GIL), and the pieces'
crc32s are joined with ``combine``: the crc32 of ``a + b`` from crc32(a), crc32(b) and len(b), by
multiplying crc32(a) by x^(8 len(b)) modulo the CRC polynomial in GF(2) (the bits reflected, as
zlib keeps them). The result is bit for bit ``zlib.crc32`` of the whole buffer. Nothing here
imports torch: the keeper reads checksums too.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PIECE = 64 << 20
"""Bytes each thread sums at a time."""
_POLY = 0xEDB88320  # the CRC-32 polynomial, bits reflected
_ONE = 1 << 31  # x^0, reflected
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _mul(a: int, b: int) -> int:
    """a * b modulo the polynomial (reflected: bit 31 is x^0)."""
    product = 0
    for bit in range(31, -1, -1):
        if a & (1 << bit):
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1  # b * x
    return product


def _x_power(exponent: int) -> int:
    """x^exponent modulo the polynomial."""
    result, square = _ONE, _ONE >> 1  # x^0 and x^1
    while exponent:
        if exponent & 1:
            result = _mul(result, square)
        square = _mul(square, square)
        exponent >>= 1
    return result


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32 of a + b from crc32(a), crc32(b) and the length of b in bytes."""
    return _mul(_x_power(8 * len_b), crc_a) ^ crc_b


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="offload-crc32")
        return _executor


def crc32(data: Any, value: int = 0) -> int:
    """zlib.crc32(data, value), summed in pieces on a few threads when data is large."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n <= 2 * PIECE:
        return zlib.crc32(view, value)
    bounds = list(range(0, n, PIECE))
    sums = list(_pool().map(lambda lo: zlib.crc32(view[lo : lo + PIECE]), bounds))
    whole = value
    for lo, s in zip(bounds, sums):
        whole = combine(whole, s, min(PIECE, n - lo))
    return whole
