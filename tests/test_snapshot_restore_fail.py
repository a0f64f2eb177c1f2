"""A restore that fails on one rank fails on every rank at once, naming it, and loses nothing
(recovery.py's agreements). 3 ranks under torchrun (gloo, CPU), each its own node and keeper,
parity m = 1 (tests/snapshot_worker.py; tests/test_snapshot_dist.py tells the same story without
failures).

Rank 1's restore is made to fail (tests/snapshot_worker.py's ``inject``) while reading its keeper,
loading its payload, decoding a chunk rebuilt from parity (its crc32 fails) and loading a flushed
snapshot. Every rank must raise, the failed one its own error and the others an error of the same
kind naming rank 1 and its reason, with the snapshot group's timeout at 60 s: an error naming rank
1 on ranks 0 and 2 is proof that they did not wait for the timeout (which would raise gloo's own
error). Then the same restore without the failure succeeds and continues bitwise: nothing the
keepers or the disk held was lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.cli.main import main as cli
from tests.keepers import kill_keeper
from tests.test_snapshot_dist import WORLD, launch, resumes

FAILED = 1
TIMEOUT_S = 60.0


def fails_on_every_rank(spec: dict, out: Path, at: str, kind: str, others: str, during: str) -> None:
    """Rank FAILED's restore fails at ``at`` with an error of ``kind``: it raises that, and every
    other rank raises ``others`` naming it, the step that failed (``during``) and its reason."""
    fail = {"phase": "resume", "fail": {"rank": FAILED, "at": at}, "snapshot": {"timeout_s": TIMEOUT_S}}
    proc = launch({**spec, **fail}, out, ok=False)
    assert proc.returncode != 0
    missing = [r for r in range(WORLD) if not (out / f"error_{r}.json").exists()]
    assert not missing, f"ranks {missing} did not raise:\n{proc.stderr[-4000:]}"
    errors = [json.loads((out / f"error_{r}.json").read_text()) for r in range(WORLD)]
    mine = errors[FAILED]
    assert mine["type"] == kind, mine
    for rank in set(range(WORLD)) - {FAILED}:
        got = errors[rank]
        assert got["type"] == others, got
        assert got["message"].startswith(
            f"offload snapshot: rank {FAILED} could not restore job 'default' ({during}): "
            f"{kind}: {mine['message']}"
        ), got


def test_a_failure_reading_or_loading_fails_every_rank_and_keeps_the_keepers(
    keepers: Path, tmp_path: Path
) -> None:
    spec = {"keepers": str(keepers), "flush": None, "steps": 6, "snap_until": 3}
    ref = tmp_path / "ref"
    launch({**spec, "phase": "reference"}, ref)

    reading = "reading its keeper"
    fails_on_every_rank(spec, tmp_path / "status", "status", "KeeperError", "KeeperError", reading)
    loading = "loading step 3"
    fails_on_every_rank(spec, tmp_path / "load", "load", "SnapshotMismatch", "SnapshotMismatch", loading)

    resumes(spec, tmp_path / "resume", ref, ["keeper"] * WORLD)


def test_a_failed_rebuild_or_disk_load_fails_every_rank_and_keeps_parity_and_disk(
    keepers: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flushed = tmp_path / "flushed"
    spec = {"keepers": str(keepers), "flush": str(flushed), "steps": 6, "snap_until": 3}
    ref = tmp_path / "ref"
    launch({**spec, "phase": "reference"}, ref)
    nodes = [keepers / f"node{r}" for r in range(WORLD)]
    assert cli(["snapshot", "flush", "--to", str(flushed), *(f"--dir={n}" for n in nodes)]) == 0
    capsys.readouterr()

    # Rank 1's node is lost: its chunks are rebuilt from parity, and the rebuild fails its crc32.
    kill_keeper(nodes[FAILED])
    loading = "loading step 3"
    fails_on_every_rank(spec, tmp_path / "rebuild", "rebuild", "SnapshotLost", "SnapshotLost", loading)
    resumes(spec, tmp_path / "parity", ref, ["keeper", "parity", "keeper"])

    # Two nodes lost (m = 1): the disk fallback, whose load fails on rank 1.
    kill_keeper(nodes[0])
    kill_keeper(nodes[2])
    loading = f"loading {flushed / 'snap_000003'}"
    fails_on_every_rank(spec, tmp_path / "disk", "disk", "FlushError", "RestoreFailed", loading)
    resumes(spec, tmp_path / "disk_again", ref, ["disk"] * WORLD)


def test_a_rank_that_cannot_reach_its_keeper_fails_every_rank_at_start(keepers: Path, tmp_path: Path) -> None:
    """Snapshotter() on rank 1 cannot connect: it raises its own error, and the others raise naming
    it, from the node-key exchange every rank takes part in (not the group's timeout)."""
    spec = {"keepers": str(keepers), "flush": None, "steps": 1, "snap_until": 0, "phase": "resume"}
    out = tmp_path / "connect"
    fail = {"fail": {"rank": FAILED, "at": "connect"}, "snapshot": {"timeout_s": TIMEOUT_S}}
    proc = launch({**spec, **fail}, out, ok=False)
    assert proc.returncode != 0
    errors = {r: json.loads((out / f"error_{r}.json").read_text()) for r in range(WORLD)}
    assert errors[FAILED] == {"type": "KeeperError", "message": "injected: no keeper answers here"}
    for rank in set(range(WORLD)) - {FAILED}:
        assert errors[rank] == {
            "type": "KeeperError",
            "message": f"offload snapshot: rank {FAILED} could not connect to its keeper: "
            "KeeperError: injected: no keeper answers here",
        }
