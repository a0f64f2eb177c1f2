"""Shared fixtures: I/O engines of each backend, and a scratch directory on a real disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import offload.io as oio

BACKENDS = ["io_uring", "threads"]


def uring_ok() -> bool:
    return oio.probe().available


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "io_uring" and not uring_ok():
        pytest.skip("io_uring refused on this machine")
    return str(request.param)


@pytest.fixture
def engine(backend: str) -> Iterator[oio.Engine]:
    with oio.Engine(backend, queue_depth=16, chunk_bytes=64 << 10) as e:
        yield e


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory where O_DIRECT works: tmp_path, or one under the working directory if the
    temporary filesystem refuses O_DIRECT."""
    if oio.check_direct(tmp_path).ok:
        yield tmp_path
        return
    alt = Path(tempfile.mkdtemp(prefix=".pytest-direct-", dir=os.getcwd()))
    try:
        yield alt
    finally:
        shutil.rmtree(alt, ignore_errors=True)


@pytest.fixture
def keepers() -> Iterator[Path]:
    """A short directory for snapshot keepers' sockets; every keeper started under it is killed
    afterwards (tests/keepers.py)."""
    from tests.keepers import remove, scratch

    base = scratch()
    try:
        yield base
    finally:
        remove(base)
