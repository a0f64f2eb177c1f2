"""``offload train`` with ``train.snapshot``: a run interrupted after step 3 and started again
restores its step-3 snapshot from the keeper and continues exactly as a run that never stopped
(float32 on the CPU: losses and final weights bitwise). Each test's keepers live under a scratch
directory of their own and are killed after it (tests/keepers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offload.cli.main import main
from tests.test_train_cli import TINY, Interrupt, short


def snapshots(keeper: Path) -> list[str]:
    return ["--set", f"train.snapshot={{every: 1, dir: {keeper}, idle_timeout_s: 60}}"]


def test_restores_from_the_keeper_and_continues_exactly(
    keepers: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from offload.cli._recipe import read_recipe
    from offload.cli.main import build_parser
    from offload.train.trainer import train

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", TINY, *short(straight, *snapshots(keepers / "a"))]) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["snapshots"] == 6 and summary["resumed_from"] is None

    def stop_after_3(line: str) -> None:
        if line.startswith("step 3/"):
            raise Interrupt  # right after step 3's snapshot started: it commits before the error goes up

    args = build_parser().parse_args(["train", TINY, *short(cut, *snapshots(keepers / "b"))])
    with pytest.raises(Interrupt):
        train(read_recipe(args), log=stop_after_3)
    capsys.readouterr()
    assert main(["train", TINY, *short(cut, *snapshots(keepers / "b"))]) == 0  # no --resume, no checkpoint
    printed = capsys.readouterr()
    assert "resuming from the snapshot of job 'tiny', from the keeper (step 3)" in printed.err
    assert "trained 3 steps (resumed after step 3)" in printed.out
    a, b = json.loads((straight / "summary.json").read_text()), json.loads((cut / "summary.json").read_text())
    assert (b["start_step"], b["resumed_from"]) == (3, "keeper")
    assert b["losses"] == a["losses"][3:]
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert list(wa) == list(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)

    # A finished run drops its snapshots: the recipe run again starts fresh.
    assert main(["train", TINY, *short(cut, *snapshots(keepers / "b"), "--set", "train.steps=2")]) == 0
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] is None


def test_a_snapshot_of_another_recipe_is_refused(
    keepers: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from offload.cli._recipe import read_recipe
    from offload.cli.main import build_parser
    from offload.train.trainer import train

    def stop_after_1(line: str) -> None:
        if line.startswith("step 1/"):
            raise Interrupt

    argv = ["train", TINY, *short(tmp_path, *snapshots(keepers / "k"))]
    with pytest.raises(Interrupt):
        train(read_recipe(build_parser().parse_args(argv)), log=stop_after_1)
    capsys.readouterr()
    assert main([*argv, "--set", "offload.optimizer.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "the snapshot of job 'tiny' (step 1, keeper) was taken by a different recipe" in err
    assert "offload.optimizer.lr: snapshot 0.003, recipe 0.1" in err


def test_bad_snapshot_field_is_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", TINY, "--set", "train.snapshot.every=0"]) == 2
    assert "train.snapshot.every = 0: must be >= 1 or 'auto'" in capsys.readouterr().err


def test_two_ranks_snapshot_and_drop_them_when_done(keepers: Path, tmp_path: Path) -> None:
    """--nproc 2, each rank its own keeper (two "nodes", parity 1): a snapshot every step on both,
    and the finished run leaves nothing of its job in either keeper."""
    import os
    import subprocess
    import sys

    from offload.snapshot.client import KeeperClient

    repo = Path(TINY).parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    where = "train.snapshot={every: 1, dir: '" + str(keepers / "node{rank}") + "', idle_timeout_s: 60}"
    argv = ["train", TINY, *short(tmp_path, "--set", "train.steps=3", "--set", where), "--nproc", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "offload.cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["snapshots"] == 3
    for rank in (0, 1):
        client = KeeperClient.connect(str(keepers / f"node{rank}"), idle_timeout=60)
        try:
            assert [s for s in client.list() if s["job"] == "tiny"] == []
        finally:
            client.close()


def test_sigterm_flushes_the_newest_snapshot_and_the_run_resumes_from_it(
    keepers: Path, tmp_path: Path
) -> None:
    """A preemption: SIGTERM to `offload train` writes its newest committed snapshot to
    flush_dir before the process ends; with the keeper gone too, the next run restores it from
    disk. After the run ends the trainer's handler is gone again."""
    import os
    import signal
    import subprocess
    import sys

    from tests.keepers import kill_keeper

    flushed = tmp_path / "flushed"
    snap = [
        "--set",
        f"train.snapshot={{every: 1, dir: {keepers / 'k'}, idle_timeout_s: 60, flush_dir: {flushed}}}",
    ]
    argv = [sys.executable, "-m", "offload.cli.main", "train", TINY, *short(tmp_path / "run", *snap)]
    argv += ["--set", "train.steps=40"]  # long enough to be interrupted
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == -signal.SIGTERM  # then the default action: the process ends
    assert "offload snapshot: SIGTERM: flushed to" in rest
    (written,) = flushed.glob("snap_*/rank_0.snap")  # the newest committed: step 2 or 3
    step = int(written.parent.name.split("_")[1])
    kill_keeper(keepers / "k")  # the node's memory is gone as well: only the disk copy is left
    assert main(["train", TINY, *short(tmp_path / "run", *snap), "--set", "train.steps=40"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["resumed_from"], summary["start_step"]) == ("disk", step) and step >= 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # The finished run deleted its flushed snapshot too: the recipe run again starts fresh.
    assert list(flushed.glob("snap_*")) == []
    assert main(["train", TINY, *short(tmp_path / "again", *snap), "--set", "train.steps=2"]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["resumed_from"] is None


def test_a_lost_snapshot_with_nothing_on_disk_is_refused_unless_resume_names_a_checkpoint(
    keepers: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The keeper's snapshots fail their crc32s (lost, though the keeper held the job: a crash)
    and neither flush_dir nor the checkpoint directory holds a step: the restart is refused,
    saying so; with --resume naming a checkpoint elsewhere it goes on from that, exactly."""
    from offload.cli._recipe import read_recipe
    from offload.cli.main import build_parser
    from offload.snapshot import segment
    from offload.snapshot.client import KeeperClient
    from offload.train.trainer import train

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", TINY, *short(straight)]) == 0

    def stop_after_3(line: str) -> None:
        if line.startswith("step 3/"):
            raise Interrupt  # the step-3 checkpoint and snapshot commit before the error goes up

    snap = snapshots(keepers / "k")
    argv = ["train", TINY, *short(cut, *snap, "--set", "train.save_every=3")]
    with pytest.raises(Interrupt):
        train(read_recipe(build_parser().parse_args(argv)), log=stop_after_3)
    client = KeeperClient.connect(keepers / "k", start=False)
    for slot in (0, 1):  # steps 2 and 3
        seg = client.open("tiny", 0, slot)
        assert seg is not None
        seg.view()[segment.HEADER_BYTES + 100] ^= 0xFF
        seg.close()
    client.close()
    capsys.readouterr()

    elsewhere = ["--set", f"train.checkpoint_dir={tmp_path / 'other'}"]
    assert main([*argv, *elsewhere]) == 2
    assert (
        "cannot restore the snapshot of job 'tiny': offload snapshot: the in-memory snapshot of job 'tiny' "
        "is lost: step 3 is gone from ranks [0] (their node or keeper lost, or the snapshot incomplete), "
        "more than can be rebuilt (parity 0); and there is no disk checkpoint in "
        f"{tmp_path / 'other'} to fall back to"
    ) in capsys.readouterr().err
    point = cut / "ckpt" / "step_000003"
    assert main([*argv, *elsewhere, "--resume", str(point)]) == 0
    err = capsys.readouterr().err
    assert f"to fall back to; loading {point}" in err and f"resuming from {point} (step 3)" in err
    a, b = json.loads((straight / "summary.json").read_text()), json.loads((cut / "summary.json").read_text())
    assert (b["start_step"], b["resumed_from"]) == (3, "checkpoint")
    assert b["losses"] == a["losses"][3:]


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("SnapshotLost", "SnapshotGone"),
        ("RestoreFailed", "CheckpointError"),
        ("KeeperError", "CheckpointError"),
    ],
)
def test_a_failed_restore_becomes_the_trainers_error(kind: str, expect: str) -> None:
    """Every rank of a failed restore gets an error offload train reports (another rank's failure
    included: RestoreFailed), never a raw traceback; a lost snapshot may still fall back to --resume."""
    import offload.snapshot as snapshot
    from offload.train.snapshots import Snapshots

    class Failing:
        def restore(self, scheduler: object) -> None:
            raise getattr(snapshot, kind)("rank 1 could not restore job 'x' (reading its keeper): boom")

    snaps = Snapshots.__new__(Snapshots)
    snaps.cfg, snaps.snap = snapshot.SnapshotConfig(job="x"), Failing()  # type: ignore[assignment]
    with pytest.raises(Exception) as info:
        snaps.restore(None, {}, 10)
    assert type(info.value).__name__ == expect
    assert "cannot restore the snapshot of job 'x'" in str(info.value) and "rank 1" in str(info.value)
