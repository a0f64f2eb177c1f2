"""offload.utils.crc.crc32: crc32 in pieces on threads equals zlib.crc32 of the whole, bit for bit."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from offload.utils import crc


@pytest.mark.parametrize("len_a,len_b", [(0, 0), (0, 9), (9, 0), (1, 1), (13, 4096), (4097, 65537)])
def test_combine_joins_two_sums(len_a: int, len_b: int) -> None:
    rng = np.random.default_rng(len_a * 7 + len_b)
    a, b = rng.bytes(len_a), rng.bytes(len_b)
    assert crc.combine(zlib.crc32(a), zlib.crc32(b), len_b) == zlib.crc32(a + b)


@pytest.mark.parametrize("pieces", [2.0, 2.5, 3.0, 7.3])
@pytest.mark.parametrize("start", [0, 0xDEADBEEF])
def test_pieces_on_threads_equal_one_pass(monkeypatch: pytest.MonkeyPatch, pieces: float, start: int) -> None:
    """Past two pieces the sum is split (small pieces here, so the test is quick), including a
    short last piece and a crc continued from an earlier value."""
    monkeypatch.setattr(crc, "PIECE", 4096)
    data = np.random.default_rng(int(pieces * 10)).bytes(int(4096 * pieces) + 1)
    assert crc.crc32(data, start) == zlib.crc32(data, start)
    assert crc.crc32(np.frombuffer(data, dtype=np.uint8)) == zlib.crc32(data)


def test_a_flipped_byte_changes_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crc, "PIECE", 4096)
    data = bytearray(np.random.default_rng(3).bytes(5 * 4096))
    before = crc.crc32(data)
    data[3 * 4096 + 17] ^= 0x01
    assert crc.crc32(data) != before
    assert crc.crc32(data) == zlib.crc32(bytes(data))
