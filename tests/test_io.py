"""Data integrity and error handling of offload.io over both backends."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import offload.io as oio
from offload import _C

KiB, MiB = 1 << 10, 1 << 20


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


def aligned_array(n: int, misalign: int = 0) -> np.ndarray:
    """A numpy array whose address is 4096-aligned plus misalign bytes."""
    raw = np.empty(n + 2 * 4096, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + misalign
    return raw[start : start + n]


SIZES = [1, 511, 4095, 4096, 4097, 65536 + 3, MiB, MiB + 4096, 3 * MiB + 17]
OFFSETS = [0, 1, 4096, 3 * 4096 + 7]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_roundtrip_grid(engine: oio.Engine, disk_dir: Path, size: int, offset: int) -> None:
    data = random_bytes(size, seed=size + offset)
    src = aligned_array(size)
    src[:] = data
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        assert f.write_from(src, offset).wait() == size
        dst = aligned_array(size)
        dst[:] = 0
        assert f.read_into(dst, offset).wait() == size
        assert f.size() == offset + size
    np.testing.assert_array_equal(dst, data)


@pytest.mark.parametrize("misalign", [1, 8, 512, 2048])
def test_misaligned_buffers(engine: oio.Engine, disk_dir: Path, misalign: int) -> None:
    size = 2 * MiB + 100
    src = aligned_array(size, misalign)
    src[:] = random_bytes(size, seed=misalign)
    dst = aligned_array(size, (misalign * 3) % 4096)
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        f.write_from(src, 4096).wait()
        f.read_into(dst, 4096).wait()
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("qd", [1, 4, 64])
def test_queue_depths_64mib(backend: str, disk_dir: Path, qd: int) -> None:
    size = 64 * MiB
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    out = torch.zeros_like(data)
    with (
        oio.Engine(backend, queue_depth=qd, chunk_bytes=MiB, threads=qd) as e,
        oio.open(disk_dir / "big.bin", "w", engine=e) as f,
    ):
        f.write_from(data).wait()
        f.sync()
        f.read_into(out).wait()
    assert torch.equal(out, data)


def test_64mib_unaligned_offset_and_size(engine: oio.Engine, disk_dir: Path) -> None:
    size = 64 * MiB - 3
    data = random_bytes(size, seed=7)
    out = np.zeros(size, dtype=np.uint8)
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        f.write_from(data, 5).wait()
        f.read_into(out, 5).wait()
    np.testing.assert_array_equal(out, data)


def test_buffer_kinds(engine: oio.Engine, disk_dir: Path) -> None:
    payload = bytes(random_bytes(10_000, seed=3))
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        f.write_from(payload).wait()  # read-only bytes can be written from
        ba = bytearray(10_000)
        f.read_into(ba).wait()
        assert bytes(ba) == payload
        mv = memoryview(bytearray(10_000))
        f.read_into(mv).wait()
        assert mv.tobytes() == payload
        t = torch.zeros(2500, dtype=torch.float32)
        f.read_into(t).wait()
        assert t.numpy().tobytes() == payload


def test_partial_nbytes(engine: oio.Engine, disk_dir: Path) -> None:
    data = random_bytes(8192, seed=1)
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        f.write_from(data, 0, nbytes=5000).wait()
        assert f.size() == 5000
        out = np.zeros(8192, np.uint8)
        assert f.read_into(out, 0, nbytes=5000).wait() == 5000
    np.testing.assert_array_equal(out[:5000], data[:5000])
    assert not out[5000:].any()


def test_batched_submission(engine: oio.Engine, disk_dir: Path) -> None:
    n, size = 32, 100_003
    blocks = [random_bytes(size, seed=i) for i in range(n)]
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        writes = engine.submit([oio.Write(f, b, i * size) for i, b in enumerate(blocks)])
        assert oio.wait_all(writes) == [size] * n
        outs = [np.zeros(size, np.uint8) for _ in range(n)]
        reads = engine.submit([oio.Read(f, o, i * size) for i, o in enumerate(outs)])
        oio.wait_all(reads)
    for b, o in zip(blocks, outs):
        np.testing.assert_array_equal(o, b)


def test_registered_buffers(backend: str, disk_dir: Path) -> None:
    arena = _C.Arena(8 * MiB, True, -1, True)
    view = np.frombuffer(
        (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * arena.size).from_address(arena.ptr))), np.uint8
    )
    view[:] = random_bytes(arena.size, seed=5)
    expect = view.copy()
    with oio.Engine(backend, chunk_bytes=MiB) as e:
        registered = e.register(arena.ptr, arena.size)
        assert registered == (backend == "io_uring")
        assert e.registered_bytes == (arena.size if registered else 0)
        with oio.open(disk_dir / "f.bin", "w", engine=e) as f:
            f.write_from(view).wait()
            view[:] = 0
            f.read_into(view).wait()
            np.testing.assert_array_equal(view, expect)
            e.unregister(arena.ptr)
            assert e.registered_bytes == 0
            view[:] = 0
            f.read_into(view).wait()  # still correct through the unregistered path
            np.testing.assert_array_equal(view, expect)
    arena.close()


def test_concurrent_submitters(engine: oio.Engine, disk_dir: Path) -> None:
    import threading

    size, nthreads = 256 * KiB + 5, 8
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                data = random_bytes(size, seed=100 + i)
                f.write_from(data, i * size).wait()
                out = np.zeros(size, np.uint8)
                f.read_into(out, i * size).wait()
                np.testing.assert_array_equal(out, data)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


# ---- failures ------------------------------------------------------------------------------


def test_read_past_eof(engine: oio.Engine, disk_dir: Path) -> None:
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        f.write_from(random_bytes(10_000)).wait()
        fut = f.read_into(np.zeros(20_000, np.uint8), 4096)
        with pytest.raises(OSError) as info:
            fut.wait()
    assert info.value.errno == errno.ENODATA
    assert info.value.filename == str(disk_dir / "f.bin")
    assert "read past end of file" in str(info.value)
    assert "read 5904 of 20000 bytes" in str(info.value)


def test_write_to_read_only_file(engine: oio.Engine, disk_dir: Path) -> None:
    p = disk_dir / "ro.bin"
    p.write_bytes(b"x" * 4096)
    with oio.open(p, "r", engine=engine) as f, pytest.raises(OSError) as info:
        f.write_from(np.zeros(4096, np.uint8))
    assert info.value.errno == errno.EBADF and "read-only" in str(info.value)


def test_open_missing_file(engine: oio.Engine, disk_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        oio.open(disk_dir / "nope" / "f.bin", "w", engine=engine)
    assert info.value.filename == str(disk_dir / "nope" / "f.bin")


def test_exclusive_create(engine: oio.Engine, disk_dir: Path) -> None:
    (disk_dir / "f.bin").write_bytes(b"")
    with pytest.raises(FileExistsError):
        oio.open(disk_dir / "f.bin", "x", engine=engine)


def test_bad_arguments(engine: oio.Engine, disk_dir: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        oio.open(disk_dir / "f.bin", "rw", engine=engine)
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        with pytest.raises(ValueError, match="offset"):
            f.write_from(np.zeros(10, np.uint8), -1)
        with pytest.raises(ValueError, match="nbytes"):
            f.write_from(np.zeros(10, np.uint8), 0, nbytes=11)
        with pytest.raises(ValueError, match="read-only"):
            f.read_into(b"immutable")
        with pytest.raises(ValueError, match="contiguous"):
            f.write_from(np.zeros((10, 10), np.uint8)[:, 0])
        with pytest.raises(TypeError, match="buffer"):
            f.write_from(12345)
    with pytest.raises(OSError, match="closed"):
        f.write_from(np.zeros(10, np.uint8))


def test_engine_argument_errors() -> None:
    with pytest.raises(ValueError, match="backend"):
        oio.Engine("spdk")
    with pytest.raises(ValueError, match="chunk_bytes"):
        oio.Engine("threads", chunk_bytes=1000)
    with pytest.raises(ValueError, match="queue_depth"):
        oio.Engine("threads", queue_depth=0)


def test_env_selects_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_IO_BACKEND", "threads")
    with oio.Engine() as e:
        assert e.backend == "threads"
    monkeypatch.setenv("OFFLOAD_IO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        oio.Engine()


def test_auto_falls_back_when_io_uring_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _C.make_engine

    def refuse(backend: str, chunk: int, depth: int):  # type: ignore[no-untyped-def]
        if backend == "io_uring":
            raise OSError(errno.EPERM, "io_uring_setup: Operation not permitted")
        return real(backend, chunk, depth)

    monkeypatch.setattr(_C, "make_engine", refuse)
    monkeypatch.delenv("OFFLOAD_IO_BACKEND", raising=False)
    with oio.Engine() as e:
        assert e.backend == "threads"
        assert e.fallback_reason and "not permitted" in e.fallback_reason
    with pytest.raises(OSError, match="io_uring backend unavailable"):
        oio.Engine("io_uring")


def test_closed_engine_refuses(disk_dir: Path) -> None:
    e = oio.Engine("threads")
    f = oio.open(disk_dir / "f.bin", "w", engine=e)
    e.close()
    with pytest.raises(RuntimeError, match="closed"):
        f.write_from(np.zeros(10, np.uint8))
    f.close()


FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, sys, numpy as np, offload.io as oio
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    e = oio.Engine(sys.argv[2], chunk_bytes=256 << 10)
    f = oio.open(sys.argv[1], "w", engine=e)
    try:
        f.write_from(np.ones(8 << 20, np.uint8), 0).wait()
    except OSError as err:
        print("ERRNO", err.errno)
        print("MSG", err)
        sys.exit(0)
    print("NO ERROR")
    """
)


def test_file_size_limit_gives_clear_error(backend: str, disk_dir: Path) -> None:
    path = disk_dir / "full.bin"
    out = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(path), backend], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"ERRNO {errno.EFBIG}" in out.stdout, out.stdout
    assert str(path) in out.stdout
    assert "wrote 1048576 of 8388608 bytes" in out.stdout
    assert "file size limit" in out.stdout


UNWRITABLE_SCRIPT = textwrap.dedent(
    """
    import os, sys, offload.io as oio
    if os.geteuid() == 0:
        os.setgid(65534); os.setuid(65534)   # root ignores permissions: become nobody
    try:
        oio.open(os.path.join(sys.argv[1], "f.bin"), "w", engine=oio.Engine("threads"))
    except PermissionError as err:
        print("PERM", err.filename)
        sys.exit(0)
    print("NO ERROR")
    """
)


def test_unwritable_directory(disk_dir: Path) -> None:
    d = disk_dir / "locked"
    d.mkdir()
    d.chmod(0o555)
    os.chmod(disk_dir, 0o755)
    out = subprocess.run(
        [sys.executable, "-c", UNWRITABLE_SCRIPT, str(d)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"PERM {d / 'f.bin'}" in out.stdout
    d.chmod(0o755)


def test_truncate_then_extend(engine: oio.Engine, disk_dir: Path) -> None:
    data = random_bytes(3 * 4096, seed=9)
    with oio.open(disk_dir / "f.bin", "w", engine=engine) as f:
        f.write_from(data).wait()
        f.truncate(4096)
        assert f.size() == 4096
        f.write_from(data[8192:], 8192).wait()  # leaves a hole at [4096, 8192)
        assert f.size() == 3 * 4096
        out = np.zeros(3 * 4096, np.uint8)
        f.read_into(out).wait()
    np.testing.assert_array_equal(out[:4096], data[:4096])
    assert not out[4096:8192].any()
    np.testing.assert_array_equal(out[8192:], data[8192:])


def test_in_flight_drops_finished_futures_and_keeps_pending_ones() -> None:
    from offload.io.future import InFlight

    class Fake:
        def __init__(self, done: bool) -> None:
            self._done = done

        def done(self) -> bool:
            return self._done

    held = InFlight()
    pending = [Fake(False) for _ in range(10)]
    held.add(pending)  # type: ignore[arg-type]
    held.add([Fake(True) for _ in range(500)])  # type: ignore[arg-type]
    kept = held.take()
    assert all(f in kept for f in pending)
    assert len(kept) < 200  # finished ones were swept as the list grew
    assert held.take() == []
