"""Crash and recovery of a 3-rank job under torchrun (gloo, CPU), each rank its own node and keeper
(tests/snapshot_worker.py), parity m = 1 (k = 2): the acceptance test of issue 8.

One story, three launches, each compared bit for bit with a run that never stopped:

1. A reference run trains 6 steps, snapshotting steps 1-3, then rank 2's trainer is killed with
   SIGKILL. ``offload snapshot flush`` writes each keeper's step 3 to disk.
2. Rank 1's keeper is killed too (its node is lost). The restarted job restores step 3: ranks 0 and
   2 from their keepers, rank 1 rebuilt from parity; steps 4-6 and the final weights equal the
   reference's.
3. The keepers of ranks 0 and 2 are killed (m + 1 = 2 nodes lost): the restart says what was lost,
   falls back to the flushed step 3 on disk, and again continues bitwise.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offload.cli.main import main as cli
from offload.snapshot import segment
from tests.keepers import kill_keeper
from tests.launch import run_ranks

REPO = Path(__file__).resolve().parents[1]
WORLD = 3


def launch(spec: dict, out: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out.mkdir()
    worker = str(REPO / "tests" / "snapshot_worker.py")
    return run_ranks(WORLD, worker, json.dumps({**spec, "out": str(out)}), ok=ok)


def continues_bitwise(out: Path, ref: Path, first: int) -> None:
    losses, expect = (
        json.loads((out / "losses.json").read_text()),
        json.loads((ref / "losses.json").read_text()),
    )
    assert losses == {k: v for k, v in expect.items() if int(k) >= first}
    state, want = load_file(str(out / "state.safetensors")), load_file(str(ref / "state.safetensors"))
    assert sorted(state) == sorted(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k


def restored(out: Path) -> list[dict]:
    return [json.loads((out / f"restored_{r}.json").read_text()) for r in range(WORLD)]


def resumes(spec: dict, out: Path, ref: Path, sources: list[str], step: int = 3) -> list[dict]:
    """Resumes spec's run into out: rank r restored step from sources[r], and the run goes on
    bitwise as the reference ref did. Returns what each rank reported of its restore."""
    launch({**spec, "phase": "resume"}, out)
    got = restored(out)
    assert [r["source"] for r in got] == sources, got
    assert {r["step"] for r in got} == {step}
    continues_bitwise(out, ref, first=step + 1)
    return got


def test_kill_trainer_then_node_then_two_nodes(
    keepers: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flushed = tmp_path / "flushed"
    spec = {"keepers": str(keepers), "flush": str(flushed), "steps": 6, "snap_until": 3}
    ref = tmp_path / "ref"
    proc = launch({**spec, "phase": "reference", "victim": 2}, ref, ok=False)
    assert proc.returncode != 0 and (ref / "losses.json").exists(), proc.stderr[-4000:]
    nodes = [keepers / f"node{r}" for r in range(WORLD)]
    stats = [json.loads((ref / f"stats_{r}.json").read_text()) for r in range(WORLD)]
    chunk = segment.chunk_bytes(max(s["payload"] for s in stats), 2)  # k = 2 data chunks
    assert {s["segment"] for s in stats} == {segment.HEADER_BYTES + 3 * chunk}  # and m = 1 parity cell

    assert cli(["snapshot", "status", *(f"--dir={n}" for n in nodes)]) == 0
    status = capsys.readouterr().out
    assert status.count("ok: 1 cell(s) of stripe(s)") == WORLD, status
    assert cli(["snapshot", "flush", "--to", str(flushed), *(f"--dir={n}" for n in nodes)]) == 0
    assert sorted(p.name for p in (flushed / "snap_000003").iterdir()) == [
        f"rank_{r}.snap" for r in range(WORLD)
    ]

    kill_keeper(nodes[1])  # rank 1's node is lost: its trainer (torn down by torchrun) and keeper
    got = resumes(spec, tmp_path / "parity", ref, ["keeper", "parity", "keeper"])
    assert "ranks [0, 2] from their keepers, ranks [1] rebuilt from parity" in got[0]["message"]

    kill_keeper(nodes[0])
    kill_keeper(nodes[2])  # two nodes lost, m = 1
    message = resumes(spec, tmp_path / "disk", ref, ["disk"] * WORLD)[0]["message"]
    assert "the in-memory snapshot of job 'default' is lost: step 3 is gone from ranks [0, 2]" in message
    assert "more than the 1 lost node(s) per coding group parity can rebuild" in message
    assert f"falling back to the disk checkpoint {flushed / 'snap_000003'} (step 3)" in message
