"""The snapshot keeper (offload/snapshot/keeper.py) and its client: segments that outlive the trainer
and die with the keeper, a private directory and socket, refusal of other users, start-up races,
the idle timeout, and the segment header (segment.py). No torch."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from offload.snapshot import keeper, segment
from offload.snapshot.client import KeeperClient, start_keeper
from offload.snapshot.keeper import Keeper, KeeperError, secure_dir
from offload.snapshot.segment import Cell, Header
from tests.keepers import keeper_dir, kill_keeper

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def where() -> Iterator[Path]:
    with keeper_dir() as d:
        yield d


def header(**changes: object) -> Header:
    return replace(
        Header(job="job", rank=0, world=3, group=(0, 1, 2), node=0, m=1, chunk=segment.ALIGN), **changes
    )


WRITER = """
import os, sys
from offload.snapshot.client import KeeperClient
from offload.snapshot.segment import HEADER_BYTES, Header, write_header
c = KeeperClient.connect(sys.argv[1])
seg = c.segment("job", 0, 0, HEADER_BYTES + 4096)
seg.view()[HEADER_BYTES : HEADER_BYTES + 5] = b"hello"
write_header(seg.mm, Header(job="job", rank=0, world=1, group=(0,), node=0, m=0, chunk=4096, step=7))
os.kill(os.getpid(), 9)  # a crashed trainer
"""


def test_a_segment_outlives_its_trainer_and_dies_with_its_keeper(where: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(where)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == -9
    client = KeeperClient.connect(where, start=False)
    seg = client.open("job", 0, 0)
    assert seg is not None
    h = seg.header()
    assert h is not None and h.step == 7
    assert bytes(seg.view()[segment.HEADER_BYTES : segment.HEADER_BYTES + 5]) == b"hello"
    seg.close()
    client.close()
    kill_keeper(where)  # the node is lost: its memory with it
    client = KeeperClient.connect(where)  # a new keeper
    assert client.open("job", 0, 0) is None
    assert client.list() == []
    client.stop()


def test_directory_and_socket_are_private(where: Path) -> None:
    client = KeeperClient.connect(where)
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert stat.S_IMODE((where / keeper.SOCKET).stat().st_mode) == 0o600
    assert client.pid == int((where / keeper.PIDFILE).read_text())
    client.stop()


def test_an_open_directory_is_refused(where: Path) -> None:
    where.mkdir(mode=0o755)
    where.chmod(0o755)
    with pytest.raises(
        KeeperError, match=r"has mode 0o755: other users could reach the keeper; make it 0700"
    ):
        KeeperClient.connect(where)


def test_a_directory_of_another_user_is_refused(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where.mkdir(mode=0o700)
    owner = where.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(KeeperError, match=rf"belongs to uid {owner}, not to this user \(uid {owner + 1}\)"):
        secure_dir(where)


def test_a_peer_of_another_uid_is_refused(where: Path) -> None:
    other = os.getuid() + 1
    k = Keeper(where, idle_timeout=0.2, uid=other)  # in this process: it serves someone else
    assert k.bind()
    server = threading.Thread(target=k.serve)
    server.start()
    try:
        with pytest.raises(
            KeeperError, match=rf"refused: this snapshot keeper serves uid {other} only, the peer is uid"
        ):
            KeeperClient.connect(where, start=False)
    finally:
        server.join(10)
    assert not server.is_alive()  # idle: no client was admitted
    assert not (where / keeper.SOCKET).exists()


def test_the_client_refuses_a_keeper_of_another_uid(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    KeeperClient.connect(where).close()
    monkeypatch.setattr(keeper, "peer_uid", lambda sock: 4242)
    with pytest.raises(KeeperError, match=r"runs as uid 4242, not as this user"):
        KeeperClient.connect(where)


def test_one_keeper_per_directory(where: Path) -> None:
    start_keeper(where, 60.0)
    first = int((where / keeper.PIDFILE).read_text())
    start_keeper(where, 60.0)  # the lock is taken: the second one leaves at once
    assert int((where / keeper.PIDFILE).read_text()) == first
    client = KeeperClient.connect(where)
    assert client.pid == first
    client.stop()


def test_an_idle_keeper_ends(where: Path) -> None:
    KeeperClient.connect(where, idle_timeout=0.2).close()
    deadline = time.monotonic() + 30
    left = [where / keeper.SOCKET, where / keeper.PIDFILE]  # removed in turn as the keeper ends
    while any(p.exists() for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (where / keeper.SOCKET).exists()
    assert not (where / keeper.PIDFILE).exists()
    with pytest.raises(
        KeeperError, match=r"no snapshot keeper is running in .*start one by taking a snapshot"
    ):
        KeeperClient.connect(where, start=False)


def test_a_missing_directory_is_not_made_by_a_reader(where: Path) -> None:
    with pytest.raises(KeeperError, match=r"no snapshot keeper is running in .* \(no such directory\)"):
        KeeperClient.connect(where, start=False)
    assert not where.exists()


def test_a_keeper_that_cannot_start_says_why(where: Path) -> None:
    where.mkdir(mode=0o755)
    where.chmod(0o755)
    with pytest.raises(KeeperError, match=r"could not start: offload snapshot keeper: .* has mode 0o755"):
        start_keeper(where, 60.0)


def test_a_socket_path_too_long_is_refused(where: Path) -> None:
    deep = where / ("d" * 100)
    with pytest.raises(KeeperError, match=r"is \d+ bytes long, more than a Unix socket path may be \(107\)"):
        KeeperClient.connect(deep)


def test_bad_requests_are_refused(where: Path) -> None:
    client = KeeperClient.connect(where)
    with pytest.raises(KeeperError, match=r"snapshot job name 'a b': use 1 to 64 letters"):
        client.segment("a b", 0, 0, segment.HEADER_BYTES)
    with pytest.raises(KeeperError, match=r"a segment needs at least 65536 bytes, asked for 10"):
        client.segment("job", 0, 0, 10)
    with pytest.raises(KeeperError, match=r"unknown request 'nope'"):
        client.request("nope")
    seg = client.segment("job", 1, 1, segment.HEADER_BYTES + 4096)
    assert client.segment("job", 1, 1, segment.HEADER_BYTES + 4096).nbytes == seg.nbytes  # the same one
    seg.view()[-1] = 9
    again = client.open("job", 1, 1)
    assert again is not None and again.view()[-1] == 9
    resized = client.segment("job", 1, 1, segment.HEADER_BYTES + 8192)  # a new, zeroed segment
    assert resized.view()[-1] == 0 and seg.view()[-1] == 9  # the old mapping still holds the old one
    client.drop("job")
    assert client.list() == []
    client.stop()


def test_header_round_trip_and_torn_headers() -> None:
    h = header(
        step=4, crcs=(1, 2), payload=77, parity_step=4, cells=(Cell(stripe=2, j=0, crc=5, members=(1, 2)),)
    )
    buf = bytearray(segment.HEADER_BYTES)
    segment.write_header(buf, h)
    assert segment.read_header(buf) == h
    assert h.k == 2 and h.nbytes == segment.HEADER_BYTES + 3 * segment.ALIGN
    torn = bytearray(buf)
    torn[20] ^= 0xFF  # a byte of the JSON: its crc32 no longer matches
    assert segment.read_header(torn) is None
    assert segment.read_header(bytearray(segment.HEADER_BYTES)) is None  # never written
    assert segment.read_header(b"something else entirely".ljust(64)) is None


def test_chunk_crcs_say_which_chunks_are_good() -> None:
    h = header(chunk=segment.ALIGN)
    buf = bytearray(h.nbytes)
    for i in range(h.k + h.m):
        lo, hi = segment.data_range(h.k, h.chunk, i)
        buf[lo:hi] = bytes([i + 1]) * (hi - lo)
    sums = segment.crc_chunks(buf, h.k, h.chunk)
    cell = segment.crc_chunks(buf, h.k, h.chunk, first=h.k, count=1)[0]
    h = header(
        step=3, crcs=tuple(sums), parity_step=3, cells=(Cell(stripe=0, j=0, crc=cell, members=tuple(sums)),)
    )
    assert segment.good_chunks(buf, h) == [0, 1] and segment.good_cells(buf, h) == [0]
    buf[segment.data_range(h.k, h.chunk, 1)[0]] ^= 1
    buf[segment.cell_range(h.k, h.chunk, 0)[0]] ^= 1
    assert segment.good_chunks(buf, h) == [0] and segment.good_cells(buf, h) == []
    assert segment.good_chunks(buf, h.invalid()) == []
    assert segment.chunk_bytes(1, 3) == segment.ALIGN
    assert segment.chunk_bytes(3 * segment.ALIGN + 1, 3) == 2 * segment.ALIGN
