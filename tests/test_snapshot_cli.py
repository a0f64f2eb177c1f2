"""``offload snapshot status | flush | stop`` (offload/cli/snapshot.py) against a keeper holding a
hand-made segment; the refusals and their messages. (The multi-rank test runs status and flush on
three keepers of a real job.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from offload.cli.main import main
from offload.snapshot import flush, segment
from offload.snapshot.client import KeeperClient
from offload.snapshot.segment import Header
from tests.keepers import keeper_dir


@pytest.fixture
def where() -> Iterator[Path]:
    with keeper_dir() as d:
        yield d


def committed(where: Path, step: int = 9) -> None:
    """A keeper holding rank 0's snapshot of step 9 (one chunk of bytes 1, 2, 3, ...)."""
    client = KeeperClient.connect(where)
    h = Header(job="job", rank=0, world=1, group=(0,), node=0, m=0, chunk=segment.ALIGN)
    seg = client.segment("job", 0, 0, h.nbytes)
    lo, hi = segment.data_range(h.k, h.chunk, 0)
    seg.view()[lo:hi] = bytes(i % 251 for i in range(hi - lo))
    crcs = tuple(segment.crc_chunks(seg.mm, h.k, h.chunk))
    seg.write_header(replace(h, step=step, crcs=crcs, payload=100))
    seg.close()
    client.close()


def test_status_flush_stop(where: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    committed(where)
    assert main(["snapshot", "status", "--dir", str(where)]) == 0
    out = capsys.readouterr().out
    assert f"keeper {where} (pid " in out and "1 segment(s), 69632 bytes" in out
    assert "no parity (one node)" in out
    assert main(["snapshot", "status", "--dir", str(where), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["segments"][0]["header"]["step"] == 9
    assert main(["snapshot", "flush", "--dir", str(where), "--to", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"flushed {tmp_path / 'snap_000009' / 'rank_0.snap'}"
    h, data = flush.read(tmp_path / "snap_000009" / "rank_0.snap")
    assert h.step == 9 and data[:3] == bytes([0, 1, 2])
    assert main(["snapshot", "stop", "--dir", str(where)]) == 0
    assert capsys.readouterr().out.strip() == f"stopped the keeper in {where}"


def test_refusals(where: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "status", "--dir", str(where)]) == 2
    assert (
        f"offload: error: no snapshot keeper is running in {where} (no such directory)"
        in capsys.readouterr().err
    )
    KeeperClient.connect(where).close()
    assert main(["snapshot", "flush", "--dir", str(where), "--to", str(tmp_path)]) == 2
    assert f"the keeper in {where} holds no committed snapshot to flush" in capsys.readouterr().err
    assert main(["snapshot"]) == 2
    assert "offload snapshot needs an action: status, flush, stop" in capsys.readouterr().err
    main(["snapshot", "stop", "--dir", str(where)])


def test_a_torn_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "rank_0.snap"
    path.write_bytes(b"x" * 100)
    with pytest.raises(flush.FlushError, match=r"rank_0.snap is not a flushed snapshot \(no valid header\)"):
        flush.read(path)
