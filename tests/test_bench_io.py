"""``offload bench io``: a small run per backend, its JSON, and every user-facing error."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

import offload.io as oio
from offload.cli import bench_io
from offload.cli.main import main

TOP_KEYS = {"size", "dir", "queue_depth", "chunk_bytes", "backends", "baseline", "ratios", "host", "date"}
SIZE = 8 << 20


def backends_here() -> list[str]:
    return ["io_uring", "threads"] if oio.probe().available else ["threads"]


def bench(tmp: Path, *args: str) -> int:
    return main(["bench", "io", "--dir", str(tmp), "--size", "8MiB", "--repeat", "1", *args])


def positive(x: object) -> bool:
    return isinstance(x, float) and x > 0


def test_bench_io_verifies_and_writes_json(
    disk_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "io.json"
    names = backends_here()
    assert (
        bench(
            disk_dir,
            "--backends",
            ",".join(names),
            "--queue-depth",
            "8",
            "--chunk",
            "256K",
            "--json",
            str(out),
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result) in (TOP_KEYS, TOP_KEYS | {"h2d"})
    assert result["size"] == SIZE
    assert result["dir"] == str(disk_dir)
    assert (result["queue_depth"], result["chunk_bytes"]) == (8, 256 << 10)
    assert set(result["backends"]) == set(names) == set(result["ratios"])
    for name in names:
        r = result["backends"][name]
        assert set(r) == {"write_GBps", "read_GBps", "verified", "samples"}
        assert r["verified"] is True
        assert positive(r["write_GBps"]) and positive(r["read_GBps"])
        assert len(r["samples"]["write_GBps"]) == len(r["samples"]["read_GBps"]) == 1
        assert set(result["ratios"][name]) == {"write", "read"}
        assert positive(result["ratios"][name]["write"]) and positive(result["ratios"][name]["read"])
    base = result["baseline"]
    assert set(base) == {"write_GBps", "read_GBps", "samples"}
    assert positive(base["write_GBps"]) and positive(base["read_GBps"])
    assert result["host"]["cpu_count"] >= 1 and result["host"]["kernel"]
    assert result["date"][:4].isdigit()
    table = capsys.readouterr().out
    for name in [*names, "baseline"]:
        assert name in table
    assert not list(disk_dir.glob(".offload-bench-*"))  # bench files removed


def test_bench_io_json_to_stdout_and_median_of_repeats(
    disk_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "bench",
            "io",
            "--dir",
            str(disk_dir),
            "--size",
            "4MiB",
            "--backends",
            "threads",
            "--repeat",
            "3",
            "--json",
            "-",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is pure JSON; the table went to stderr
    assert "write GB/s" in captured.err
    samples = result["backends"]["threads"]["samples"]["write_GBps"]
    assert len(samples) == 3
    assert result["backends"]["threads"]["write_GBps"] == sorted(samples)[1]
    assert len(result["baseline"]["samples"]["read_GBps"]) == 3


def test_auto_backend_follows_env(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OFFLOAD_IO_BACKEND", "threads")
    assert bench(disk_dir, "--backends", "auto", "--json", "-") == 0
    assert list(json.loads(capsys.readouterr().out)["backends"]) == ["threads"]


@pytest.mark.parametrize("size", ["lots", "12XB", "-1G", "1.5B"])
def test_bad_size_is_a_usage_error(tmp_path: Path, size: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "io", "--dir", str(tmp_path), f"--size={size}"]) == 2
    err = capsys.readouterr().err
    assert f"argument --size: invalid size {size!r}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1000"], "size must be a positive multiple of 4096 bytes (O_DIRECT), got 1000"),
        (["--size", "0"], "size must be a positive multiple of 4096 bytes (O_DIRECT), got 0"),
        (["--size", "8MiB", "--repeat", "0"], "repeat must be at least 1, got 0"),
        (["--size", "8MiB", "--queue-depth", "0"], "queue_depth must be at least 1, got 0"),
        (["--size", "8MiB", "--chunk", "1000"], "chunk_bytes must be a positive multiple of 4096, got 1000"),
        (
            ["--size", "8MiB", "--backends", "spdk"],
            "backends must be among auto, io_uring, threads, got spdk",
        ),
        (["--size", "8MiB", "--backends", "threads,threads"], "without repeats"),
    ],
)
def test_bad_options_are_clear_errors(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "io", "--dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload: error: ")
    assert message in err


def test_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert bench(missing) == 2
    assert capsys.readouterr().err == f"offload: error: --dir {missing} does not exist\n"


def test_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert bench(f) == 2
    assert capsys.readouterr().err == f"offload: error: --dir {f} is not a directory\n"


def test_not_enough_disk_space(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bench_io.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    assert bench(disk_dir) == 2
    err = capsys.readouterr().err
    assert f"not enough free disk space in {disk_dir}: the bench needs 8 MiB" in err
    assert "1 MiB is free" in err


def test_unwritable_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bench_io.tempfile, "NamedTemporaryFile", refuse)
    assert bench(tmp_path) == 2
    assert capsys.readouterr().err == f"offload: error: --dir {tmp_path} is not writable: Permission denied\n"


def test_render_with_h2d() -> None:
    figures = {"write_GBps": 2.0, "read_GBps": 1.5, "samples": {"write_GBps": [2.0], "read_GBps": [1.5]}}
    result = {
        "size": 2 << 30,
        "dir": "/mnt/nvme",
        "queue_depth": 64,
        "chunk_bytes": 1 << 20,
        "backends": {"io_uring": {**figures, "verified": True}},
        "baseline": {**figures, "write_GBps": 2.5},
        "ratios": {"io_uring": {"write": 0.8, "read": 1.0}},
        "host": {"page_cache_dropped": True},
        "h2d": {"pool_GBps": 51.0, "torch_pinned_GBps": 52.0, "ratio": 51.0 / 52.0},
        "date": "2026-11-22T00:00:00+00:00",
    }
    text = bench_io.render(result)
    assert "2 GiB in /mnt/nvme" in text
    assert "io_uring" in text and "0.80" in text and "yes" in text
    assert "h2d copy (1 GiB)" in text and "51.00" in text and "0.98" in text


def test_direct_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        oio, "check_direct", lambda d: oio.DirectCheck(False, f"the filesystem of {d} refuses O_DIRECT")
    )
    assert bench(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"the filesystem of {tmp_path} refuses O_DIRECT; bench io measures O_DIRECT" in err


def test_not_enough_host_memory(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import psutil

    memory = namedtuple("memory", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1 << 30, 4 << 20))
    assert bench(disk_dir) == 2
    assert (
        "not enough host memory: the bench holds two 8 MiB buffers, 4 MiB is available"
        in capsys.readouterr().err
    )


def refuse_backend(monkeypatch: pytest.MonkeyPatch, refused: set[str]) -> None:
    real = oio.Engine

    def engine(backend: str = "auto", **kwargs: Any) -> oio.Engine:
        if backend in refused:
            raise OSError(1, f"{backend} backend unavailable: Operation not permitted")
        return real(backend, **kwargs)

    monkeypatch.setattr(oio, "Engine", engine)


def test_refused_backend_is_skipped(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    refuse_backend(monkeypatch, {"io_uring"})
    assert bench(disk_dir, "--backends", "io_uring,threads", "--json", "-") == 0
    captured = capsys.readouterr()
    assert list(json.loads(captured.out)["backends"]) == ["threads"]
    assert "skipping io_uring: [Errno 1] io_uring backend unavailable" in captured.err


def test_every_backend_refused(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    refuse_backend(monkeypatch, {"io_uring", "threads"})
    assert bench(disk_dir) == 2
    assert "offload: error: no io backend could be measured" in capsys.readouterr().err
    assert not list(disk_dir.glob(".offload-bench-*"))


def test_verification_failure_exits_nonzero(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch, "equal", lambda a, b: False)
    assert bench(disk_dir, "--backends", "threads", "--json", "-") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["backends"]["threads"]["verified"] is False
    assert "offload: error: read-back verification failed for threads" in captured.err
    assert "NO" in captured.err  # the table, on stderr with --json -
