"""offload._C.crc32 and copy_crc32: zlib's crc32, bit for bit (the PCLMUL folding where the CPU has
it, and the portable tables), and a copy that sums what it copies."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import _C


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200_000), st.integers(0, 15), st.integers(0, 2**32 - 1))
def test_crc32_is_zlibs(n: int, offset: int, seed: int) -> None:
    """Any length (the 16-byte loop and its tail), any alignment, any running crc."""
    buf = np.random.default_rng(n).integers(0, 256, n + offset, dtype=np.uint8)
    data = buf[offset:]
    assert _C.crc32(data.ctypes.data, n, seed) == zlib.crc32(data, seed)
    assert _C.crc32(data.ctypes.data, n) == zlib.crc32(data)
    assert _C.crc32_portable(data.ctypes.data, n, seed) == zlib.crc32(data, seed)  # no PCLMUL


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 300_000), st.integers(0, 7), st.integers(0, 7), st.integers(0, 2**32 - 1))
def test_copy_crc32_copies_and_sums(n: int, src_off: int, dst_off: int, seed: int) -> None:
    """Across its 64 KiB blocks: the copy is exact, the sum is zlib's, the bytes around untouched."""
    src = np.random.default_rng(n + 1).integers(0, 256, n + src_off, dtype=np.uint8)[src_off:]
    dst = np.full(n + dst_off + 1, 7, dtype=np.uint8)
    got = _C.copy_crc32(dst.ctypes.data + dst_off, src.ctypes.data, n, seed)
    assert got == zlib.crc32(src, seed)
    assert np.array_equal(dst[dst_off : dst_off + n], src)
    assert (dst[:dst_off] == 7).all() and dst[-1] == 7


def test_known_values() -> None:
    """The CRC-32 check value, and the empty input."""
    check = np.frombuffer(b"123456789", dtype=np.uint8)
    assert _C.crc32(check.ctypes.data, 9) == _C.crc32_portable(check.ctypes.data, 9) == 0xCBF43926
    big = np.random.default_rng(5).integers(0, 256, 5 << 20, dtype=np.uint8)  # the folding's long loop
    assert (
        _C.crc32(big.ctypes.data, big.size) == _C.crc32_portable(big.ctypes.data, big.size) == zlib.crc32(big)
    )
    assert _C.crc32(0, 0) == 0 and _C.crc32(0, 0, 0xDEADBEEF) == 0xDEADBEEF


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        _C.crc32(0, -1)  # a negative length
    with pytest.raises(TypeError):
        _C.copy_crc32(0, 0, 4, -1)  # a negative crc


@pytest.mark.parametrize("n", [0, 100, 4095, 4096, 100_003])
def test_update_is_zlibs_with_the_core_and_without(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """offload.utils.crc.update: the native sum from NATIVE_MIN bytes, zlib's below and where the
    core is not built; any buffer (bytes, a read-only slice of a memoryview, a numpy array)."""
    from offload.utils import crc

    raw = np.random.default_rng(n).integers(0, 256, n + 5, dtype=np.uint8).tobytes()
    for data in (raw[5:], memoryview(raw)[5:], np.frombuffer(raw, dtype=np.uint8)[5:]):
        assert crc.update(data) == zlib.crc32(raw[5:])
        assert crc.update(data, 77) == zlib.crc32(raw[5:], 77)
    calls: list[int] = []
    real = crc._native
    monkeypatch.setattr(crc, "_native", None)  # a tree without the built core
    assert crc.update(raw[5:], 3) == zlib.crc32(raw[5:], 3)

    class Spy:
        @staticmethod
        def crc32(addr: int, nbytes: int, value: int) -> int:
            calls.append(nbytes)
            return real.crc32(addr, nbytes, value)

    monkeypatch.setattr(crc, "_native", Spy)
    assert crc.update(raw[5:]) == zlib.crc32(raw[5:])
    assert calls == ([n] if n >= crc.NATIVE_MIN else [])
