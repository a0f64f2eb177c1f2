"""crc32 of a concatenation from the crc32s of its parts (zlib's ``crc32_combine``, which Python's
zlib module does not expose).

A checkpoint's staging ring sums each slice of a tensor on its own thread and combines the
slices' crc32s in order when the file is done, so a large tensor is summed in parallel instead of
slice after slice. The arithmetic is zlib's (1.2.12+, crc32.c): the crc32 of A || B is crc32(A)
times x^(8 len(B)) modulo the CRC-32 polynomial, plus crc32(B), in the bit-reflected
representation zlib uses. Plain integers, no torch; x^(8 len(B)) is cached per length (most
slices have one of a few lengths), so a combination costs about 5 us (40 us uncached).
``offload.snapshot.crc.combine`` computes the same without the cache.
"""

from __future__ import annotations

from functools import lru_cache

POLY = 0xEDB88320  # CRC-32 (IEEE 802.3, zlib's), bit-reflected
_ONE = 1 << 31  # the polynomial 1 (x^0) in the reflected representation


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (both reflected)."""
    m, p = _ONE, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    """x^(2^k) modulo the polynomial, k = 0..31."""
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


@lru_cache(maxsize=256)
def _x8n(nbytes: int) -> int:
    """x^(8 nbytes) modulo the polynomial."""
    p, k, n = _ONE, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b)."""
    if len2 < 0:
        raise ValueError(f"len2 = {len2}: must be >= 0")
    return _multmodp(_x8n(len2), crc1) ^ crc2


def join(parts: list[tuple[int, int]]) -> int:
    """zlib.crc32 of the concatenation of parts given as (crc32, length), in order."""
    crc = 0
    for c, n in parts:
        crc = combine(crc, c, n)
    return crc
