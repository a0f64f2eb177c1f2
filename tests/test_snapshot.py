"""In-memory snapshots of a one-process run (offload/snapshot/snapshotter.py, recovery.py): restore
from the keeper continues bitwise (float32 on the CPU), for lazy and synchronous capture and with
records on the host and on the "device"; the disk fallback; every refusal with its message."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import offload
from offload.checkpoint.capture import CaptureFence
from offload.cli.main import main
from offload.config import ConfigError, Tier, load_config
from offload.plan import make_plan
from offload.snapshot import flush, payload, segment
from offload.snapshot.client import KeeperClient
from offload.snapshot.config import SnapshotConfig, interval, memory_factor
from offload.snapshot.payload import SnapshotMismatch
from offload.snapshot.recovery import SnapshotLost
from offload.snapshot.snapshotter import Snapshotter
from tests.keepers import keeper_dir, kill_keeper
from tests.models import batches, tiny

STEPS, SNAPPED = 5, 3


@pytest.fixture
def where() -> Iterator[Path]:
    with keeper_dir() as d:
        yield d


def make(layers: int = 3, **overrides: Any) -> tuple[Any, Any, Any]:
    """GPT-2 with dropout (the RNG must come back) and a scheduler (its state too)."""
    model, opt = offload.wrap(
        tiny("gpt2", layers=layers, dropout=0.1),
        **{"device": "cpu", "dtype": "float32", "optimizer": {"lr": 3e-3, "weight_decay": 0.1}, **overrides},
    )
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


DATA = batches(STEPS)


def train(model: Any, opt: Any, sched: Any, steps: range, snap: Snapshotter | None = None) -> list[float]:
    losses = []
    for step in steps:
        ids = DATA[step - 1]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if snap is not None and step <= SNAPPED:
            snap.snapshot(step, scheduler=sched, extra={"position": step})
    return losses


def reference(
    where: Path, wrap: dict[str, Any] | None = None, **overrides: Any
) -> tuple[list[float], dict[str, torch.Tensor], SnapshotConfig]:
    """A run of STEPS steps that snapshots the first SNAPPED: its losses and final weights."""
    cfg = SnapshotConfig(dir=str(where), **overrides)
    model, opt, sched = make(**(wrap or {}))
    snap = Snapshotter(model, opt, cfg)
    losses = train(model, opt, sched, range(1, STEPS + 1), snap)
    snap.wait()
    snap.close()
    return losses, offload.state_dict(model), cfg


def resume(cfg: SnapshotConfig, **wrap: Any) -> tuple[Any, list[float], dict[str, torch.Tensor]]:
    model, opt, sched = make(**wrap)
    restored = Snapshotter(model, opt, cfg).restore(scheduler=sched)
    losses = train(model, opt, sched, range((restored.step or 0) + 1, STEPS + 1))
    return restored, losses, offload.state_dict(model)


def assert_continues(
    ref: tuple[list[float], dict[str, torch.Tensor], Any], losses: list[float], state: Any
) -> None:
    assert losses == ref[0][SNAPPED:]
    for k, v in ref[1].items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize(
    ("lazy", "wrap"),
    [
        (True, {"optimizer": {"lr": 3e-3, "weight_decay": 0.1, "overlap_backward": True}}),
        (True, {"placement": {"device_blocks": 1}}),
        (False, {}),
    ],
    ids=["lazy-overlap", "lazy-device-block", "sync"],
)
def test_restore_from_the_keeper_continues_bitwise(where: Path, lazy: bool, wrap: dict[str, Any]) -> None:
    ref = reference(where, wrap, lazy=lazy)
    restored, losses, state = resume(ref[2], **wrap)
    assert (restored.source, restored.step, restored.extra) == ("keeper", SNAPPED, {"position": SNAPPED})
    assert "restored step 3 of job 'default': ranks [0] from their keepers" in restored.message
    assert_continues(ref, losses, state)


def test_two_buffers_keep_the_previous_snapshot(where: Path) -> None:
    reference(where)
    client = KeeperClient.connect(where, start=False)
    steps = sorted(s["header"]["step"] for s in client.list())
    assert steps == [SNAPPED - 1, SNAPPED]
    client.close()


def test_nothing_to_restore_starts_fresh(where: Path) -> None:
    model, opt, sched = make()
    restored = Snapshotter(model, opt, dir=str(where)).restore(scheduler=sched)
    assert (restored.source, restored.step) == ("none", None)
    assert (
        "no keeper holds a snapshot of job 'default', and no disk snapshot: starting fresh"
        in restored.message
    )


def test_a_lost_keeper_falls_back_to_the_flushed_snapshot(where: Path, tmp_path: Path) -> None:
    ref = reference(where, flush_dir=str(tmp_path))
    model, opt, _ = make()
    path = Snapshotter(model, opt, ref[2]).flush()
    assert path == tmp_path / "snap_000003" / "rank_0.snap"
    assert flush.flushed_steps(tmp_path, world=1) == [SNAPPED]
    kill_keeper(where)
    restored, losses, state = resume(ref[2])
    assert (restored.source, restored.step) == ("disk", SNAPPED)
    assert (
        "no keeper holds a snapshot of job 'default'; falling back to the disk checkpoint" in restored.message
    )
    assert_continues(ref, losses, state)
    # A finished run deletes its own flushed files (offload train does), not another job's.
    assert flush.remove(tmp_path, "other", 0) == [] and path.exists()
    assert flush.remove(tmp_path, "default", 0) == [path]
    assert not path.parent.exists() and flush.flushed_steps(tmp_path) == []


def test_a_newer_checkpoint_wins_over_the_flushed_snapshot(where: Path, tmp_path: Path) -> None:
    cfg = SnapshotConfig(dir=str(where), flush_dir=str(tmp_path))
    model, opt, sched = make()
    snap = Snapshotter(model, opt, cfg)
    train(model, opt, sched, range(1, 3), snap)
    snap.flush()  # step 2
    train(model, opt, sched, range(3, 4))
    offload.save(model, opt, tmp_path, step=3, scheduler=sched, extra={"position": 3}).wait()
    kill_keeper(where)
    model, opt, sched = make()
    restored = Snapshotter(model, opt, cfg).restore(scheduler=sched)
    assert (restored.source, restored.step, restored.extra) == ("disk", 3, {"position": 3})
    assert f"falling back to the disk checkpoint {tmp_path / 'step_000003'} (step 3)" in restored.message


def test_a_checkpoint_in_checkpoint_dir_is_the_fallback_and_the_keeper_forgets_newer_steps(
    where: Path, tmp_path: Path
) -> None:
    """With the memory lost, an offload.save checkpoint under checkpoint_dir (not flush_dir) is
    loaded; the newer, incomplete snapshots the keeper still holds are cleared, so that they never
    mix with the snapshots of the run that goes on from the checkpoint."""
    ckpt = tmp_path / "ckpt"
    cfg = SnapshotConfig(dir=str(where), buffers=1, checkpoint_dir=str(ckpt))
    model, opt, sched = make()
    snap = Snapshotter(model, opt, cfg)
    train(model, opt, sched, range(1, 3), snap)
    offload.save(model, opt, ckpt, step=2, scheduler=sched, extra={"position": 2}).wait()
    train(model, opt, sched, range(3, 4), snap)
    snap.close()
    client = KeeperClient.connect(where, start=False)
    seg = client.open("default", 0, 0)
    assert seg is not None
    before = seg.header()
    assert before is not None and before.step == 3
    seg.view()[segment.HEADER_BYTES + 100] ^= 0xFF  # step 3 fails its crc32: lost, one buffer
    model, opt, sched = make()
    restored = Snapshotter(model, opt, cfg).restore(scheduler=sched)
    assert (restored.source, restored.step, restored.extra) == ("disk", 2, {"position": 2})
    assert restored.path == ckpt / "step_000002"
    assert "step 3 is gone from ranks [0]" in restored.message
    assert f"falling back to the disk checkpoint {ckpt / 'step_000002'} (step 2)" in restored.message
    assert seg.header() == before.invalid()  # step 3 cleared
    seg.close()
    client.close()


def test_without_a_trace_of_the_job_in_the_keeper_checkpoint_dir_is_not_a_fallback(
    where: Path, tmp_path: Path
) -> None:
    """A keeper that holds no step of the job (a first start, or a finished run, which leaves its
    last checkpoint behind) starts fresh: checkpoint_dir counts only after a crash."""
    model, opt, sched = make()
    offload.save(model, opt, tmp_path, step=5, scheduler=sched, extra={"position": 5}).wait()
    model, opt, sched = make()
    restored = Snapshotter(model, opt, dir=str(where), checkpoint_dir=str(tmp_path)).restore(scheduler=sched)
    assert (restored.source, restored.step) == ("none", None)
    assert (
        "no keeper holds a snapshot of job 'default', and no disk snapshot: starting fresh"
        in restored.message
    )


def test_a_corrupt_snapshot_without_disk_is_lost(where: Path) -> None:
    ref = reference(where, buffers=1)
    client = KeeperClient.connect(where, start=False)
    seg = client.open("default", 0, 0)
    assert seg is not None
    seg.view()[segment.HEADER_BYTES + 100] ^= 0xFF  # a flipped bit: the chunk fails its crc32
    model, opt, sched = make()
    with pytest.raises(SnapshotLost) as e:
        Snapshotter(model, opt, ref[2]).restore(scheduler=sched)
    assert str(e.value) == (
        "offload snapshot: the in-memory snapshot of job 'default' is lost: step 3 is gone from ranks [0] "
        "(their node or keeper lost, or the snapshot incomplete), more than can be rebuilt (parity 0); and "
        "there is no disk checkpoint (neither SnapshotConfig.flush_dir nor checkpoint_dir is set) to fall "
        "back to"
    )
    model, opt, sched = make()
    roots = {"flush_dir": str(where.parent / "flushed"), "checkpoint_dir": str(where.parent / "ckpt")}
    with pytest.raises(SnapshotLost) as e:
        Snapshotter(model, opt, ref[2], **roots).restore(scheduler=sched)
    assert str(e.value).endswith(
        f"and there is no disk checkpoint in {roots['flush_dir']} or {roots['checkpoint_dir']} to fall back to"
    )


def test_a_snapshot_of_another_model_is_refused(where: Path) -> None:
    ref = reference(where)
    model, opt = offload.wrap(tiny("gpt2", layers=2), device="cpu", dtype="float32")
    with pytest.raises(
        SnapshotMismatch,
        match=r"was taken by another model or placement \(4 records in the snapshot, 3 in the run\)",
    ):
        Snapshotter(model, opt, ref[2]).restore()
    model, opt, _ = make()
    with pytest.raises(SnapshotMismatch, match=r"has scheduler state; pass scheduler= accordingly"):
        Snapshotter(model, opt, ref[2]).restore()


def test_sigterm_flushes_then_does_what_it_did_before(where: Path, tmp_path: Path) -> None:
    model, opt, sched = make()
    snap = Snapshotter(model, opt, dir=str(where), flush_dir=str(tmp_path))
    train(model, opt, sched, range(1, 3), snap)
    snap.wait()  # the handler flushes the newest committed snapshot, not one in flight
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        snap.install_sigterm()
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        assert flush.flushed_steps(tmp_path, world=1) == [2]
        h, _ = flush.read(tmp_path / "snap_000002" / "rank_0.snap")
        assert (h.step, h.job, h.parity_step) == (2, "default", -1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_every_and_auto(where: Path) -> None:
    model, opt, _ = make(layers=2)
    snap = Snapshotter(model, opt, dir=str(where), every=2)
    taken = [s for s in range(1, 6) if snap.maybe_snapshot(s) is not None]
    assert taken == [2, 4]
    auto = Snapshotter(model, opt, dir=str(where), job="auto")
    assert auto.maybe_snapshot(1) is not None  # the first step, then as its cost allows
    assert interval(stall_s=0.01, step_s=1.0, budget=0.03) == 1
    assert interval(stall_s=0.1, step_s=1.0, budget=0.03) == 4
    assert interval(stall_s=0.1, step_s=0.0, budget=0.03) == 1


def test_refusals(where: Path) -> None:
    for bad, match in [
        ({"every": 0}, r"every = 0: must be >= 1 or 'auto'"),
        ({"buffers": 3}, r"buffers = 3: must be 1 or 2"),
        ({"parity": -1}, r"parity = -1: must be >= 0"),
        ({"budget": 1.5}, r"budget = 1.5: must be between 0 and 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            SnapshotConfig(**bad)
    model, opt, _ = make(layers=2)
    snap = Snapshotter(model, opt, dir=str(where))
    with pytest.raises(ValueError, match=r"extra must be plain JSON data"):
        snap.snapshot(1, extra={"x": object()})
    with pytest.raises(
        ValueError, match=r"flush\(\) needs a directory: pass root= or set SnapshotConfig.flush_dir"
    ):
        snap.flush()
    with pytest.raises(
        flush.FlushError, match=r"rank 0 holds no committed snapshot of job 'default' to flush"
    ):
        snap.flush(where)
    with pytest.raises(ValueError, match=r"install_sigterm\(\) needs SnapshotConfig.flush_dir"):
        snap.install_sigterm()
    with pytest.raises(
        ValueError,
        match=r"snapshot parity = 1 needs at least 2 nodes \(each with its own keeper\); this job has 1",
    ):
        Snapshotter(model, opt, dir=str(where), parity=1)


def test_the_plan_counts_what_the_keeper_holds(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, opt, sched = make()
    snap = Snapshotter(model, opt, dir=str(where))
    train(model, opt, sched, range(1, 3), snap)
    snap.wait()
    held = sum(seg.nbytes for seg in snap.segments.values())  # two buffers
    cfg = load_config(None, device="cpu", dtype="float32")
    plan = make_plan(tiny("gpt2", layers=3), cfg, batch_size=1, seq_len=1, snapshot=memory_factor(1))
    planned = plan.get("snapshot", Tier.HOST)
    # What the plan leaves out, per buffer: the header, the index (about 20 KiB: the RNG states)
    # and page rounding.
    assert 0 <= held - planned <= 2 * (segment.HEADER_BYTES + (32 << 10) + 2 * payload.BASE_ALIGN)
    assert memory_factor(3) == 2 * 3 / 2 and memory_factor(5, parity=2, buffers=1) == 5 / 3
    # Over 3 nodes (k = 2, m = 1) a snapshot takes (k + m) / k = 1.5 times what it takes on one.
    three = make_plan(tiny("gpt2", layers=3), cfg, batch_size=1, seq_len=1, snapshot=memory_factor(3))
    assert abs(three.get("snapshot", Tier.HOST) - 1.5 * planned) <= 1
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    assert main(["plan", recipe, "--no-detect", "--snapshot-nodes", "3"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("snapshot "))
    note = next(line for line in out.splitlines() if line.startswith("note: snapshot: "))
    assert note.startswith(
        "note: snapshot: 3 node(s), stripes of k = 2 data + m = 1 parity chunk(s): each rank's snapshot "
        "takes (k + m) / k = 1.50 x its master, m and v in its node's keeper, per buffer; x 2 buffer(s): "
    )
    assert note.endswith(" per rank (the snapshot row)") and " x 3.00 = " in note
    assert float(row.split()[2]) > 0  # the host column
    assert main(["plan", recipe, "--no-detect", "--snapshot-nodes", "3", "--snapshot-parity", "3"]) == 2
    assert "snapshot parity = 3 needs at least 4 nodes" in capsys.readouterr().err


def test_adam_state_on_nvme_is_captured_through_its_tier(where: Path, disk_dir: Path) -> None:
    nvme = {"placement": {"optimizer_state": "nvme"}, "nvme_dirs": [str(disk_dir / "state")]}
    ref = reference(where, nvme)
    restored, losses, state = resume(ref[2], **nvme)
    assert (restored.source, restored.step) == ("keeper", SNAPPED)
    assert_continues(ref, losses, state)


def test_a_save_waits_for_the_snapshot_in_flight(
    where: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """offload.save() right after a lazy snapshot started (its capture slowed down, so it is still
    copying): the save waits for the snapshot's capture fence instead of replacing it, and both
    the snapshot and the checkpoint hold step 2."""
    model, opt, sched = make(layers=2)
    snap = Snapshotter(model, opt, dir=str(where))
    train(model, opt, sched, range(1, 2), snap)
    snap.wait()
    capture = payload.capture

    def slow(*args: Any) -> None:
        time.sleep(0.05)
        capture(*args)

    monkeypatch.setattr(payload, "capture", slow)
    train(model, opt, sched, range(2, 3), snap)  # its snapshot is being captured now
    fence = model.runtime.updater.fence
    assert fence is not None and not fence.released.is_set()
    handle = offload.save(model, opt, tmp_path, step=2, scheduler=sched, extra={"position": 2})
    assert fence.released.is_set()  # save() started only once the snapshot's capture was done
    handle.wait()
    snap.wait()  # not void
    assert {h.step for h in (snap.header(0), snap.header(1)) if h is not None} >= {2}
    monkeypatch.undo()
    assert offload.checkpoint.verify(handle.path) == []  # no problems
    snap.close()


def test_a_failed_snapshot_is_reported_once_and_the_last_one_stays(
    where: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, opt, sched = make(layers=2)
    snap = Snapshotter(model, opt, dir=str(where))
    train(model, opt, sched, range(1, 2), snap)
    snap.wait()
    rt = model.runtime
    ready = CaptureFence.wait_ready

    def save_meanwhile(fence: CaptureFence, rec: Any) -> None:
        ready(fence, rec)
        rt.updater.fence = None  # as a capture that does not wait its turn would

    monkeypatch.setattr(CaptureFence, "wait_ready", save_meanwhile)
    failed = snap.snapshot(2)
    with pytest.raises(RuntimeError, match=r"another capture replaced this snapshot's capture fence"):
        failed.wait()
    monkeypatch.undo()
    steps = [h.step for h in (snap.header(0), snap.header(1)) if h is not None]
    assert sorted(steps) == [-1, 1]  # the failed one's slot holds nothing; step 1 stays
    snap.snapshot(3).wait()
    snap.snapshot(4).wait()
    err = capsys.readouterr().err
    assert err.count("offload snapshot: the snapshot of step 2 failed: another capture replaced") == 1
