"""The staging ring and the safetensors files streamed through it (offload/checkpoint/staging.py).

Files larger than the whole ring go through it in aligned chunks; what lands on disk must be a
safetensors file that ``safetensors.safe_open`` reads back bit for bit, with each tensor's crc32
equal to zlib's over its bytes.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from offload import io as oio
from offload.checkpoint import staging as staging_mod
from offload.checkpoint.format import read_header
from offload.checkpoint.staging import FileStream, Staging, chunk_size, safetensors_header
from offload.utils import crc

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


def write(path: Path, tensors: dict[str, torch.Tensor], staging: Staging) -> dict[str, int]:
    header, index = safetensors_header([(k, t.dtype, t.shape) for k, t in tensors.items()])
    with oio.open(path, "x", direct=oio.check_direct(path.parent).ok, engine=staging.engine) as f:
        fs = FileStream(staging, f)
        fs.put(None, torch.frombuffer(bytearray(header), dtype=torch.uint8))
        for k, t in tensors.items():
            fs.put(k, t.reshape(-1).view(torch.uint8))
        fs.finish()
        staging.drain()
        f.sync()
    crc = fs.crcs()
    assert fs.bytes == path.stat().st_size == len(header) + sum(e["nbytes"] for e in index.values())
    return crc


@pytest.fixture
def ring() -> Staging:
    staging = Staging(4096, 2, pin=False)
    yield staging
    staging.close()


def test_file_larger_than_the_ring_reads_back(disk_dir: Path, ring: Staging) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "master/a": torch.randn(37, 61, generator=g),  # 9028 bytes: straddles chunks
        "exp_avg/b": torch.randn(3000, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    crc = write(disk_dir / "x.safetensors", tensors, ring)
    with safe_open(str(disk_dir / "x.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
            assert crc[k] == zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes()), k
    header, start = read_header(disk_dir / "x.safetensors")
    assert start % 8 == 0 and header["__metadata__"]["format"] == "pt"


def test_ring_reused_across_files(disk_dir: Path, ring: Staging) -> None:
    for i in range(3):
        t = torch.full((5000,), float(i))
        write(disk_dir / f"{i}.safetensors", {"t": t}, ring)
    for i in range(3):
        with safe_open(str(disk_dir / f"{i}.safetensors"), framework="pt") as f:
            assert torch.equal(f.get_tensor("t"), torch.full((5000,), float(i)))


def test_failed_write_surfaces_when_its_chunk_is_taken(disk_dir: Path, ring: Staging) -> None:
    class Failed:
        def wait(self, timeout: float | None = None) -> int:
            raise OSError(5, "Input/output error (injected)")

    lease = ring.take()
    ring.give(lease, [Failed()])  # type: ignore[list-item]
    ring.give(ring.take(), [])
    with pytest.raises(OSError, match="injected"):
        ring.take()
    ring.drain()  # the failed chunk went back, settled: the ring is whole again
    a, b = ring.take(), ring.take()
    assert a is not b
    ring.give(a, [])
    ring.give(b, [])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 4), st.integers(1, 700))
def test_copy_split_over_threads(n: int, threads: int, slice_bytes: int) -> None:
    """Staging.copy splits host copies over its threads: every byte lands, whatever the split."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(staging_mod, "COPY_THREADS", threads)
        m.setattr(staging_mod, "COPY_SLICE", slice_bytes)
        ring = Staging(4096, 1, pin=False)
        try:
            src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
            dst = np.zeros(n + 3, dtype=np.uint8)
            sums = ring.copy(dst[1 : n + 1], src)
            assert np.array_equal(dst[1 : n + 1], src) and dst[0] == dst[n + 1] == dst[n + 2] == 0
            assert sum(k for _, k in sums) == n and crc.join(sums) == zlib.crc32(src)  # summed as copied
        finally:
            ring.close()


def test_copy_of_strided_bytes_copies_and_sums_them() -> None:
    """A source that is not contiguous takes numpy's copy and zlib's crc32: same bytes, same sum."""
    ring = Staging(4096, 1, pin=False)
    try:
        src = np.arange(600, dtype=np.uint8)[::3]
        dst = np.zeros(200, dtype=np.uint8)
        assert ring.copy(dst, src) == [(zlib.crc32(np.ascontiguousarray(src)), 200)]
        assert np.array_equal(dst, src)
        with pytest.raises(ValueError):
            ring.copy(np.zeros(5, dtype=np.uint8), np.zeros(6, dtype=np.uint8))
    finally:
        ring.close()


def test_file_through_copy_threads_and_crc_slices(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_mod, "COPY_THREADS", 3)
    monkeypatch.setattr(staging_mod, "COPY_SLICE", 1000)
    monkeypatch.setattr(staging_mod, "CRC_SLICE", 777)  # a tensor's crc32 from many slices, combined
    ring = Staging(8192, 3, pin=False)
    try:
        t = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
        crc = write(disk_dir / "c.safetensors", {"t": t}, ring)
    finally:
        ring.close()
    with safe_open(str(disk_dir / "c.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)
    assert crc["t"] == zlib.crc32(t.numpy().tobytes())


def test_bad_ring_and_chunk_sizes() -> None:
    with pytest.raises(ValueError, match="chunk_bytes = 100"):
        Staging(100, 2, pin=False)
    assert chunk_size(10) == 4096 and chunk_size(1 << 40) == 64 << 20


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 9), max_size=3)),
        min_size=1,
        max_size=6,
    )
)
def test_header_matches_safetensors(tmp_path_factory: pytest.TempPathFactory, specs: list) -> None:
    """Any mix of dtypes and shapes: safe_open reads what the computed header describes."""
    d = tmp_path_factory.mktemp("h")
    tensors = {
        f"t{i}": torch.arange(int(torch.tensor(s).prod()) if s else 1).reshape(s).to(dt)
        for i, (dt, s) in enumerate(specs)
    }
    staging = Staging(4096, 2, pin=False)
    try:
        write(d / "h.safetensors", tensors, staging)
    finally:
        staging.close()
    with safe_open(str(d / "h.safetensors"), framework="pt") as f:
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t), k
