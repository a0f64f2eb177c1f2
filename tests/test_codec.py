"""offload.snapshot.codec: the field, the matrix, every loss pattern up to m, the SIMD paths
against the scalar one, the buffer types and every user-facing error."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.snapshot import codec

PATHS = codec.info()["available"]
NOT_AN_INT: Any = 1.5
SHAPES = [(4, 1), (4, 2), (6, 3), (10, 4), (3, 5)]


def reference_mul() -> np.ndarray:
    """Products modulo 0x11d by shift and add, independent of the codec's log/exp tables."""
    a = np.arange(256, dtype=np.uint16)[:, None].repeat(256, axis=1)
    b = np.arange(256, dtype=np.uint16)[None, :].repeat(256, axis=0)
    product = np.zeros((256, 256), dtype=np.uint16)
    for _ in range(8):
        product ^= np.where(b & 1, a, 0)
        b >>= 1
        a <<= 1
        a = np.where(a & 0x100, a ^ 0x11D, a)
    return product.astype(np.uint8)


REF_MUL = reference_mul()


def reference_encode(data: list[np.ndarray], m: int) -> list[np.ndarray]:
    p = codec.parity_matrix(len(data), m)
    return [np.bitwise_xor.reduce([REF_MUL[c][d] for c, d in zip(row, data)]) for row in p]


def random_chunks(rng: np.random.Generator, k: int, nbytes: int, misalign: int = 0) -> list[np.ndarray]:
    """k chunks, each starting `misalign` bytes past an allocation, so vector loads are unaligned."""
    return [rng.integers(0, 256, nbytes + misalign, dtype=np.uint8)[misalign:] for _ in range(k)]


def loss_patterns(n: int, m: int) -> itertools.chain[tuple[int, ...]]:
    return itertools.chain.from_iterable(itertools.combinations(range(n), lost) for lost in range(m + 1))


def test_snapshot_package_import_is_lean() -> None:
    code = "import sys, offload.snapshot; print(sorted({'numpy', 'torch', 'offload._C'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# -- the field ----------------------------------------------------------------------------------


def test_field_tables_match_reference_and_field_laws() -> None:
    mul, inv = codec.field_tables()
    assert np.array_equal(mul, REF_MUL)
    assert np.array_equal(mul, mul.T)
    assert (mul[0] == 0).all() and np.array_equal(mul[1], np.arange(256))
    assert (mul[np.arange(1, 256), inv[1:]] == 1).all()
    assert sorted(inv[1:]) == list(range(1, 256))
    a, b, c = np.ix_(np.arange(256), np.arange(256), np.arange(256))
    assert np.array_equal(mul[a, b ^ c], mul[a, b] ^ mul[a, c])  # distributive, all 2^24 triples
    assert np.array_equal(mul[mul[a, b], c], mul[a, mul[b, c]])  # associative


# -- the matrix ---------------------------------------------------------------------------------


def test_parity_matrix_is_scaled_cauchy_with_a_row_of_ones() -> None:
    mul, inv = codec.field_tables()
    k, m = 7, 5
    p = codec.parity_matrix(k, m)
    assert p.shape == (m, k) and p.dtype == np.uint8
    i, j = np.ix_(np.arange(m), np.arange(k))
    assert np.array_equal(p, mul[inv[(k + i) ^ j], k ^ j])
    assert (p[0] == 1).all()


def test_parity_matrix_known_values() -> None:
    # Pins the on-the-wire format: changing the matrix would make old parity undecodable.
    assert codec.parity_matrix(4, 3).tolist() == [[1, 1, 1, 1], [166, 70, 187, 123], [245, 104, 143, 82]]


def test_largest_code_decodes() -> None:
    rng = np.random.default_rng(0)
    k, m = 200, codec.MAX_CHUNKS - 200
    data = random_chunks(rng, k, 67)
    chunks: list[Any] = [*data, *codec.encode(data, m)]
    for i in rng.choice(k + m, m, replace=False):
        chunks[i] = None
    assert all(np.array_equal(a, b) for a, b in zip(codec.decode(chunks, k, m), data))


# -- every loss pattern -------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "m"), SHAPES)
@settings(max_examples=6, deadline=None)
@given(nbytes=st.integers(0, 700), misalign=st.integers(0, 63), seed=st.integers(0, 2**32 - 1))
def test_every_loss_pattern_up_to_m_restores_the_data(
    k: int, m: int, nbytes: int, misalign: int, seed: int
) -> None:
    data = random_chunks(np.random.default_rng(seed), k, nbytes, misalign)
    parity = codec.encode(data, m)
    assert all(np.array_equal(a, b) for a, b in zip(parity, reference_encode(data, m)))
    if m == 1 and nbytes:
        assert np.array_equal(parity[0], np.bitwise_xor.reduce(data))
    for lost in loss_patterns(k + m, m):
        chunks = [None if i in lost else c for i, c in enumerate(data + parity)]
        restored = codec.decode(chunks, k, m)
        assert all(np.array_equal(a, b) for a, b in zip(restored, data)), f"lost {lost}"


# -- SIMD paths against the scalar one ----------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 24),
    m=st.integers(1, 12),
    nbytes=st.integers(0, 5000),
    misalign=st.integers(0, 63),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_path_equals_scalar(k: int, m: int, nbytes: int, misalign: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = random_chunks(rng, k, nbytes, misalign)
    want = codec.encode(data, m, isa="scalar")
    lost = set(rng.choice(k + m, rng.integers(0, m + 1), replace=False).tolist())
    chunks = [None if i in lost else c for i, c in enumerate(data + want)]
    for isa in PATHS:
        got = codec.encode(data, m, isa=isa)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), isa
        restored = codec.decode(chunks, k, m, isa=isa)
        assert all(np.array_equal(a, b) for a, b in zip(restored, data)), isa


@pytest.mark.parametrize("isa", PATHS)
def test_threads_and_stripes_do_not_change_the_result(isa: str) -> None:
    # 30 inputs make stripes of about 17 KiB; 9 outputs exceed every path's register group, so
    # rows are computed in groups stripe by stripe. 3 threads split the odd length unevenly.
    rng = np.random.default_rng(1)
    k, m, nbytes = 30, 9, 300_007
    data = random_chunks(rng, k, nbytes, 3)
    want = codec.encode(data, m, isa="scalar")
    for threads in (1, 2, 3):
        got = codec.encode(data, m, threads=threads, isa=isa)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), threads
    chunks = [None if i in range(2, 2 + m) else c for i, c in enumerate(data + want)]
    restored = codec.decode(chunks, k, m, threads=3, isa=isa)
    assert all(np.array_equal(a, b) for a, b in zip(restored, data))


# -- buffer types and results -------------------------------------------------------------------


def test_bytes_like_inputs_give_numpy_results() -> None:
    data = [b"abcdefg", bytearray(b"hijklmn"), memoryview(b"opqrstu")]
    parity = codec.encode(data, 2)
    assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.shape == (7,) for p in parity)
    restored = codec.decode([None, data[1], data[2], parity[0], None], 3, 2)
    assert bytes(restored[0]) == b"abcdefg"
    assert [bytes(r) for r in restored[1:]] == [b"hijklmn", b"opqrstu"]


def test_torch_inputs_give_torch_results_and_views() -> None:
    data = [torch.randint(0, 256, (4, 33), dtype=torch.uint8) for _ in range(3)]
    parity = codec.encode(data, 2)
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.uint8 and p.shape == (132,) for p in parity)
    restored = codec.decode([data[0], None, data[2], None, parity[1]], 3, 2)
    assert isinstance(restored[0], torch.Tensor) and isinstance(restored[1], torch.Tensor)
    assert torch.equal(restored[1], data[1].reshape(-1))
    assert restored[0].data_ptr() == data[0].data_ptr()  # a survivor is a view, not a copy


def test_empty_chunks() -> None:
    # An empty tensor's data_ptr() is 0, the core's mark for a lost chunk: nothing may reach it.
    empty = [torch.empty(0, dtype=torch.uint8) for _ in range(3)]
    parity = codec.encode(empty, 2)
    assert [p.numel() for p in parity] == [0, 0]
    restored = codec.decode([empty[0], None, empty[2], None, parity[1]], 3, 2)
    assert [r.numel() for r in restored] == [0, 0, 0]
    assert [len(r) for r in codec.decode([b"", None, b"", b"", None], 3, 2)] == [0, 0, 0]


def test_out_buffers_receive_the_results() -> None:
    rng = np.random.default_rng(2)
    data = random_chunks(rng, 4, 1000)
    parity_out = [np.zeros(1000, dtype=np.uint8) for _ in range(2)]
    parity = codec.encode(data, 2, out=parity_out)
    assert all(np.shares_memory(a, b) for a, b in zip(parity, parity_out))
    assert np.array_equal(parity_out[1], reference_encode(data, 2)[1])
    out: list[Any] = [np.zeros(1000, dtype=np.uint8), None, bytearray(1000), None]
    restored = codec.decode([None, data[1], None, data[3], *parity], 4, 2, out=out)
    assert np.array_equal(out[0], data[0]) and bytes(out[2]) == data[2].tobytes()
    assert np.shares_memory(restored[0], out[0])


def test_info_and_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    info = codec.info()
    assert info["isa"] in info["available"] and "scalar" in info["available"]
    monkeypatch.setenv("OFFLOAD_EC_ISA", "scalar")
    assert codec.info()["isa"] == "scalar"
    monkeypatch.setenv("OFFLOAD_EC_ISA", "sse9")
    with pytest.raises(
        ValueError, match=r"OFFLOAD_EC_ISA: .*one of auto, gfni, avx512, avx2, scalar; got 'sse9'"
    ):
        codec.encode([b"ab"], 1)


@pytest.mark.parametrize("isa", [i for i in codec.ISAS if i not in PATHS] or ["none-missing"])
def test_a_path_the_cpu_lacks_is_refused(isa: str) -> None:
    if isa == "none-missing":
        pytest.skip("this CPU has every path")
    with pytest.raises(ValueError, match=f"{isa}: this CPU lacks it"):
        codec.encode([b"ab"], 1, isa=isa)


# -- failures -----------------------------------------------------------------------------------


def test_more_than_m_lost_is_refused() -> None:
    data = [b"abcd", b"efgh", b"ijkl"]
    parity = codec.encode(data, 2)
    with pytest.raises(
        ValueError, match=r"3 chunks lost \(indices \[0, 2, 4\]\); m = 2 parity chunks restore at most 2"
    ):
        codec.decode([None, data[1], None, parity[0], None], 3, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: codec.encode([b"abc", b"ab"], 1),
            "equal lengths; data chunk 0 has 3 bytes, data chunk 1 has 2",
        ),
        (lambda: codec.encode([b"a"] * 250, 7), "k \\+ m must be <= 256; got k=250, m=7"),
        (lambda: codec.encode([b"a"], 0), "m must be an int >= 1; got 0"),
        (lambda: codec.encode([b"a"], NOT_AN_INT), "m must be an int >= 1; got 1.5"),
        (lambda: codec.encode([], 1), "k must be an int >= 1; got 0"),
        (lambda: codec.encode(b"abc", 1), "data_chunks must be a list of chunks; got bytes"),
        (lambda: codec.encode([b"a"], 1, threads=0), "threads must be an int >= 1; got 0"),
        (
            lambda: codec.encode([b"a"], 1, isa="sse2"),
            "isa must be None or one of scalar, avx2, avx512, gfni",
        ),
        (lambda: codec.encode([[1, 2]], 1), "data chunk 0 must be bytes-like, a numpy uint8 array"),
        (lambda: codec.encode([np.zeros(4, np.int32)], 1), "data chunk 0 must be a uint8 array; got int32"),
        (lambda: codec.encode([np.zeros((4, 4), np.uint8).T], 1), "data chunk 0 must be C-contiguous"),
        (
            lambda: codec.encode([torch.zeros(4)], 1),
            "data chunk 0 must be a CPU uint8 tensor; got torch.float32",
        ),
        (
            lambda: codec.encode([torch.zeros(4, 4, dtype=torch.uint8).T], 1),
            "data chunk 0 must be contiguous",
        ),
        (lambda: codec.encode([b"ab"], 1, out=[b"xy"]), "parity chunk 0 is an output and must be writable"),
        (lambda: codec.encode([b"ab"], 2, out=[bytearray(2)]), "out must hold m = 2 parity chunks; got 1"),
        (lambda: codec.encode([b"ab"], 1, out=[bytearray(3)]), "output chunks must have the input length 2"),
        (lambda: codec.decode([b"a", b"b"], 2, 1), "chunks must hold k \\+ m = 3 entries .*; got 2"),
        (lambda: codec.decode([None, b"b", b"c"], 2, 1, out=[None, None]), "out 0 must be bytes-like"),
        (lambda: codec.decode([None, b"b", b"c"], 2, 1, out=[None]), "out must hold k = 2 entries"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_output_overlapping_an_input_is_refused() -> None:
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="overlaps an input or another output"):
        codec.encode([buf[:32], buf[32:]], 1, out=[buf[16:48]])
    with pytest.raises(ValueError, match="overlaps an input or another output"):
        codec.decode([None, buf[:32], buf[32:]], 2, 1, out=[buf[8:40], None])
