"""Pruning before the save (``prune="before"``, offload/checkpoint/recycle.py): the steps a save
makes surplus are taken out of the listing when it starts and their files are written over in
place; the result is the same checkpoint, bit for bit loadable, and failures (a full disk, EIO, a
failed rename while taking steps out, a failed prune after the commit) leave no half step listed.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import offload
from offload.checkpoint import (
    CheckpointError,
    CheckpointNotFound,
    Retention,
    list_checkpoints,
    load,
    resolve,
    save,
    verify,
)
from offload.checkpoint import recycle as recycle_mod
from offload.checkpoint import retention as retention_mod
from offload.checkpoint.format import abandoned, latest_marker, temp_dirname
from offload.checkpoint.recycle import Recycler
from offload.checkpoint.retention import doomed
from tests.models import batches, tiny
from tests.test_checkpoint import assert_same_state
from tests.test_checkpoint import train as train_sched
from tests.test_checkpoint_async import fail_allocate, fail_write

OPT = {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5}


def make() -> tuple[Any, Any]:
    return offload.wrap(tiny("llama"), device="cpu", dtype="float32", optimizer=OPT)


def train(model: Any, opt: Any, data: list[torch.Tensor]) -> list[float]:
    return train_sched(model, opt, None, data)


def steps_of(root: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(root)]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name)


def inodes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in path.iterdir() if p.name.endswith(".safetensors")}


# ---- doomed(upcoming=...) and the Recycler on their own ---------------------------------------


def fake_steps(root: Path, steps: list[int], latest: int | None) -> None:
    for s in steps:
        d = root / f"step_{s:06d}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        (d / "block.0.safetensors").write_bytes(bytes([s]) * 100)
        (d / "block.1.safetensors").write_bytes(bytes([s]) * 50)
        (d / "extra.bin").write_bytes(b"x")
    if latest is not None:
        (root / "latest").write_text(f"step_{latest:06d}\n")


def test_doomed_counts_the_upcoming_step_as_committed_and_latest(tmp_path: Path) -> None:
    fake_steps(tmp_path, [1, 2, 3], latest=3)
    keep1 = Retention(keep_last=1)
    assert doomed(tmp_path, keep1) == [tmp_path / "step_000001", tmp_path / "step_000002"]
    assert doomed(tmp_path, keep1, upcoming="step_000004") == [tmp_path / f"step_00000{s}" for s in (1, 2, 3)]
    assert doomed(tmp_path, Retention(keep_last=2, keep_every=2), upcoming="step_000004") == [
        tmp_path / "step_000001"
    ]  # 3 and 4 the newest two, 2 a milestone
    with pytest.raises(ValueError, match="not a step directory name"):
        doomed(tmp_path, keep1, upcoming="step_4.tmp-x")


def test_recycler_takes_steps_out_keeps_files_by_name(tmp_path: Path) -> None:
    fake_steps(tmp_path, [1, 2, 3], latest=2)
    r = Recycler.take(tmp_path, [tmp_path / "step_000001", tmp_path / "step_000002"], {"block.0.safetensors"})
    assert steps_of(tmp_path) == [3]
    assert not (tmp_path / "latest").exists()  # it named a step taken out
    first, second = r.taken  # the first step's file of that name is kept; the rest deleted now
    assert first.name.startswith("step_000001.tmp-del-") and second.name.startswith("step_000002.tmp-del-")
    assert sorted(os.listdir(first)) == ["block.0.safetensors"] and os.listdir(second) == []
    assert r.nbytes == 100
    dest = tmp_path / "new"
    dest.mkdir()
    assert r.claim("block.0.safetensors", dest / "block.0.safetensors")
    assert (dest / "block.0.safetensors").read_bytes() == bytes([1]) * 100
    assert not r.claim("block.0.safetensors", dest / "again")  # claimed already
    assert not r.claim("block.1.safetensors", dest / "b")  # not kept
    r.close()
    assert leftovers(tmp_path) == [] and steps_of(tmp_path) == [3]


def test_recycler_leaves_latest_naming_a_kept_step(tmp_path: Path) -> None:
    fake_steps(tmp_path, [1, 2], latest=2)
    Recycler.take(tmp_path, [tmp_path / "step_000001"], set()).close()
    assert latest_marker(tmp_path) == "step_000002" and steps_of(tmp_path) == [2]


def test_recycler_failing_midway_removes_what_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_steps(tmp_path, [1, 2, 3], latest=3)
    real = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(a).name == "step_000002":
            raise OSError(errno.EIO, "Input/output error (injected rename)")
        real(a, b)

    monkeypatch.setattr(recycle_mod.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        Recycler.take(tmp_path, [tmp_path / "step_000001", tmp_path / "step_000002"], {"block.0.safetensors"})
    assert steps_of(tmp_path) == [2, 3] and leftovers(tmp_path) == []
    assert latest_marker(tmp_path) == "step_000003"  # named a step that was not taken


def dead_owner_dir(root: Path, step_dir: str, deleting: bool = False) -> Path:
    """A temporary directory made by a process that has ended since (a killed save or prune)."""
    code = (
        "import os, sys; from offload.checkpoint.format import temp_dirname; "
        "print(temp_dirname(sys.argv[1], deleting=sys.argv[2] == '1'))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code, step_dir, "1" if deleting else "0"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    path = root / out.stdout.strip()
    path.mkdir(parents=True)
    return path


def test_abandoned_names_only_directories_of_ended_processes_here(tmp_path: Path) -> None:
    dead = dead_owner_dir(tmp_path, "step_000004")
    dead_del = dead_owner_dir(tmp_path, "step_000001", deleting=True)
    mine = tmp_path / temp_dirname("step_000005")  # this process: a save in progress
    mine.mkdir()
    elsewhere = tmp_path / dead.name.replace(f"@{socket.gethostname()}", "@another-host")
    elsewhere.mkdir()
    (tmp_path / "step_000009.tmp-abc").mkdir()  # no owner in the name: never touched
    assert abandoned(tmp_path) == sorted([dead, dead_del])
    assert doomed(tmp_path, Retention(keep_last=1)) == []  # not steps
    removed = offload.checkpoint.prune(tmp_path, Retention(keep_last=1))
    assert removed == sorted([dead, dead_del])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, elsewhere.name, "step_000009.tmp-abc"]
    )


def test_cli_prune_reports_leftovers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_checkpoint import cli

    fake_steps(tmp_path, [1, 2], latest=2)
    dead_owner_dir(tmp_path, "step_000003")
    assert cli(["ckpt", "prune", str(tmp_path), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 step(s) and 1 directory left by killed saves" in out
    assert steps_of(tmp_path) == [2] and leftovers(tmp_path) == []


# ---- save(prune="before") ---------------------------------------------------------------------


def test_before_writes_over_the_surplus_step_in_place(tmp_path: Path) -> None:
    data = batches(5)
    model, opt = make()
    straight = train(model, opt, data)
    expect = offload.state_dict(model)
    model.runtime.close()

    root = tmp_path / "ckpt"
    model, opt = make()
    losses = train(model, opt, data[:1])
    first = save(model, opt, root, step=1, keep_last=1, prune="before")
    assert first.wait().name == "step_000001" and first.stats.reused_bytes == 0  # nothing to recycle
    for step in (2, 3):
        losses += train(model, opt, data[step - 1 : step])
        before = inodes(root / f"step_{step - 1:06d}")
        handle = save(model, opt, root, step=step, keep_last=1, prune="before")
        path = handle.wait()
        assert steps_of(root) == [step] and latest_marker(root) == path.name and leftovers(root) == []
        assert inodes(path) == before  # the very same files, written over
        stats = handle.stats
        assert stats.reused_bytes == sum(p.stat().st_size for p in path.glob("*.safetensors"))
        assert stats.reused_bytes < stats.bytes  # the manifest is written fresh
        assert verify(path) == []
    at_save = offload.state_dict(model)
    model.runtime.close()

    model, opt = make()
    load(model, opt, root)
    assert_same_state(offload.state_dict(model), at_save)
    losses += train(model, opt, data[3:])
    assert losses == straight
    assert_same_state(offload.state_dict(model), expect)
    model.runtime.close()


def test_before_keeps_what_retention_keeps(tmp_path: Path) -> None:
    model, opt = make()
    for step in range(1, 8):
        train(model, opt, batches(1))
        save(model, opt, tmp_path, step=step, keep_last=2, keep_every=3, prune="before").wait()
        assert steps_of(tmp_path)[-1] == step
    assert steps_of(tmp_path) == [3, 6, 7]  # the same as pruning after the commit
    assert latest_marker(tmp_path) == "step_000007" and leftovers(tmp_path) == []
    model.runtime.close()


def test_before_resizes_a_file_of_another_size(tmp_path: Path) -> None:
    model, opt = make()
    train(model, opt, batches(1))
    save(model, opt, tmp_path, step=1).wait()
    old = tmp_path / "step_000001"
    size0 = (old / "block.0.safetensors").stat().st_size
    with open(old / "block.0.safetensors", "ab") as f:
        f.write(b"\xff" * 10000)  # longer than the new file: cut to size
    os.truncate(old / "block.1.safetensors", 100)  # shorter: extended
    (old / "unrelated.bin").write_bytes(b"z" * 10)  # a name the save does not write: deleted
    handle = save(model, opt, tmp_path, step=2, keep_last=1, prune="before")
    path = handle.wait()
    assert verify(path) == [] and (path / "block.0.safetensors").stat().st_size == size0
    assert not (path / "unrelated.bin").exists() and steps_of(tmp_path) == [2] and leftovers(tmp_path) == []
    assert 0 < handle.stats.reused_bytes < handle.stats.bytes
    model.runtime.close()


def test_before_reclaims_what_a_killed_save_left(tmp_path: Path) -> None:
    """A save killed halfway left its temporary directory (tens of GB on a real run): the next
    save with prune="before" writes over its files instead of needing room for new ones."""
    model, opt = make()
    train(model, opt, batches(1))
    save(model, opt, tmp_path / "ref", step=1).wait()
    killed = dead_owner_dir(tmp_path, "step_000001")
    for f in (tmp_path / "ref" / "step_000001").glob("*.safetensors"):
        (killed / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # cut short: killed
    old = inodes(killed)
    handle = save(model, opt, tmp_path, step=2, keep_last=1, prune="before")
    path = handle.wait()
    assert inodes(path) == old and handle.stats.reused_bytes > 0
    assert verify(path) == [] and steps_of(tmp_path) == [2] and leftovers(tmp_path) == []
    model.runtime.close()


def test_prune_argument_is_checked(tmp_path: Path) -> None:
    model, opt = make()
    with pytest.raises(ValueError, match="prune = 'sometime': must be one of after, before"):
        save(model, opt, tmp_path, step=1, keep_last=1, prune="sometime")
    with pytest.raises(ValueError, match='prune = "before" needs keep_last'):
        save(model, opt, tmp_path, step=1, prune="before")
    assert list(tmp_path.iterdir()) == []
    model.runtime.close()


def fail_taking_out(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(a).name == "step_000002":
            raise OSError(errno.EIO, "Input/output error (injected rename)")
        real(a, b)

    monkeypatch.setattr(recycle_mod.os, "rename", rename)


def test_save_failing_mid_prune_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps are surplus; taking the second out fails: the first is gone (it was out of the
    listing already), the others stay committed and verify, the save fails and leaves nothing."""
    model, opt = make()
    for step in (1, 2, 3):
        train(model, opt, batches(1))
        save(model, opt, tmp_path, step=step).wait()
    train(model, opt, batches(1))
    with monkeypatch.context() as m:
        fail_taking_out(m)
        handle = save(model, opt, tmp_path, step=4, keep_last=1, prune="before")
        train(model, opt, batches(1))  # the held updates are released when the save fails
        with pytest.raises(OSError, match="injected rename"):
            handle.wait()
    assert steps_of(tmp_path) == [2, 3] and leftovers(tmp_path) == []
    assert all(verify(p) == [] for _, p in list_checkpoints(tmp_path))
    assert latest_marker(tmp_path) is None and resolve(tmp_path) == tmp_path / "step_000003"
    assert save(model, opt, tmp_path, step=5, keep_last=1, prune="before").wait().name == "step_000005"
    assert steps_of(tmp_path) == [5] and leftovers(tmp_path) == []
    model.runtime.close()


@pytest.mark.parametrize(("inject", "code"), [(fail_allocate, errno.ENOSPC), (fail_write, errno.EIO)])
def test_failed_write_before_loses_the_recycled_step(
    inject: Any, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk or EIO mid-write: the surplus step was taken out and partly overwritten, so it is
    gone with the failed save; nothing half-written is listed; the next save starts afresh."""
    model, opt = make()
    train(model, opt, batches(1))
    save(model, opt, tmp_path, step=1, keep_last=1, prune="before").wait()
    train(model, opt, batches(1))
    with monkeypatch.context() as m:
        inject(m)
        handle = save(model, opt, tmp_path, step=2, keep_last=1, prune="before")
        train(model, opt, batches(1))
        with pytest.raises(OSError, match="injected") as raised:
            handle.wait()
    assert raised.value.errno == code
    assert steps_of(tmp_path) == [] and leftovers(tmp_path) == [] and latest_marker(tmp_path) is None
    with pytest.raises(CheckpointNotFound):
        resolve(tmp_path)
    handle = save(model, opt, tmp_path, step=3, keep_last=1, prune="before")
    assert handle.wait().name == "step_000003" and handle.stats.reused_bytes == 0
    assert verify(tmp_path / "step_000003") == []
    model.runtime.close()


def test_failed_prune_after_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune="after": the commit stands when deleting the old step fails; wait() says so."""
    model, opt = make()
    train(model, opt, batches(1))
    save(model, opt, tmp_path, step=1).wait()
    train(model, opt, batches(1))

    real = retention_mod.shutil.rmtree

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if ".tmp-del-" in Path(path).name:
            raise OSError(errno.EIO, "Input/output error (injected rmtree)")
        real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(retention_mod.shutil, "rmtree", rmtree)
        handle = save(model, opt, tmp_path, step=2, keep_last=1)
        with pytest.raises(CheckpointError, match="step_000002 is committed, but pruning older steps failed"):
            handle.wait()
    assert steps_of(tmp_path) == [2] and latest_marker(tmp_path) == "step_000002"
    assert verify(tmp_path / "step_000002") == []
    [left] = leftovers(tmp_path)  # the step being deleted: out of the listing, never loaded
    assert left.startswith("step_000001.tmp-del-")
    model2, opt2 = make()
    load(model2, opt2, tmp_path)
    model2.runtime.close()
    model.runtime.close()
