"""offload.utils.crc: combine / join against zlib.crc32 of the whole, bit for bit."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.utils.crc import combine, join


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_combine_equals_crc32_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=700), max_size=12))
def test_join_of_slices(parts: list[bytes]) -> None:
    assert join([(zlib.crc32(p), len(p)) for p in parts]) == zlib.crc32(b"".join(parts))


def test_long_lengths_and_edges() -> None:
    a, b = b"x" * 12345, bytes(range(256)) * (1 << 14)  # 4 MiB: the length's high bits count
    assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert combine(0x1234ABCD, 0, 0) == 0x1234ABCD  # nothing appended
    assert join([]) == zlib.crc32(b"") == 0
    with pytest.raises(ValueError, match="len2 = -1"):
        combine(0, 0, -1)
