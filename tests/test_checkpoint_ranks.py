"""Multi-rank checkpoints written per rank (format version 2; offload/checkpoint/job.py, ranks.py,
pieces.py): each rank writes its shard of every streamed block into files of its own, rank 0 the
replicated records and, once every rank reported its files fsynced, the manifest.

Gloo ranks on the CPU in float32. A 2-rank checkpoint loads at 1, 2 and 3 ranks and training goes
on as if it had never stopped; verify and load name a corrupt shard's file and tensor; export and
diff put the shards together (bitwise what one process saves of the same state); a failure on rank
1 fails the save on both ranks and leaves the checkpoint before it; ``prune="before"`` writes each
rank's files over the surplus step's. This file is also the ranks' worker for the last three.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import offload
from offload.checkpoint import CheckpointCorrupt, list_checkpoints, verify
from offload.checkpoint.diff import diff
from offload.checkpoint.export import export_hf
from offload.checkpoint.format import read_manifest
from offload.cli.main import main as cli
from tests.launch import run_ranks
from tests.models import batches, run_steps, tiny
from tests.test_dist import global_batch, torchrun

REPO = Path(__file__).resolve().parents[1]
SPEC = {"family": "llama", "batch": 6, "steps": 4, "wrap": {"optimizer": {"lr": 3e-3, "weight_decay": 0.1}}}
BLOCKS = 3  # tiny("llama") has 3 layers: 3 streamed blocks, each sharded over the ranks
KEY = "exp_avg/model.layers.1.mlp.up_proj.weight"


def wrap_one() -> tuple[Any, Any]:
    return offload.wrap(tiny("llama"), device="cpu", dtype="float32", **SPEC["wrap"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """2 ranks, 4 steps, a checkpoint after step 2: its step directory and the straight losses."""
    out = tmp_path_factory.mktemp("ranks_saved")
    losses, _ = torchrun(2, {**SPEC, "save_at": 2}, out)
    return out / "ckpt" / "step_000002", losses


def test_each_rank_writes_its_own_shard_files(saved: tuple[Path, list[float]]) -> None:
    path, _ = saved
    manifest = read_manifest(path)
    assert manifest["format_version"] == 2
    assert manifest["ranks"]["world"] == 2
    assert sorted(manifest["ranks"]["records"]) == [f"block.{i}" for i in range(BLOCKS)]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"block.{i}.rank{r:05d}.safetensors" for i in range(BLOCKS) for r in range(2)] + [
        "resident.safetensors"
    ]  # no whole block file: no shard went through rank 0
    assert verify(path) == []
    # Rank 1's file holds rank 1's shard: plain safetensors, the parts the manifest says, and
    # (since a 1-process load of the whole checkpoint gives those values) the right ones.
    model, opt = wrap_one()
    offload.load(model, opt, path)
    whole = offload.state_dict(model)
    model.runtime.close()
    shards = 0
    for i in range(BLOCKS):
        part = load_file(str(path / f"block.{i}.rank00001.safetensors"))
        assert part
        for key, value in part.items():
            (shard,) = [s for s in manifest["tensors"][key]["shards"] if s["rank"] == 1]
            assert shard["file"] == f"block.{i}.rank00001.safetensors"
            lo, hi = shard["range"]
            assert value.shape == (hi - lo,)
            if key.startswith("master/"):
                assert torch.equal(value, whole[key.removeprefix("master/")].reshape(-1)[lo:hi]), key
            shards += 1
    assert shards > 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_two_rank_checkpoint_loads_at_any_world_size(
    world: int, saved: tuple[Path, list[float]], tmp_path: Path
) -> None:
    """The steps after the checkpoint equal the 2-rank run that went straight on."""
    path, straight = saved
    if world == 1:
        model, opt = wrap_one()
        offload.load(model, opt, path)
        losses = run_steps(model, opt, 2, 1, lambda step, micro: global_batch(SPEC, 2 + step, micro))
        model.runtime.close()
    else:
        losses, _ = torchrun(world, {**SPEC, "start": 2, "load": str(path)}, tmp_path)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight[2:]), rtol=1e-5, atol=1e-6)


def corrupt(path: Path, out: Path, how: str) -> Path:
    """A copy of the checkpoint path with rank 1's file of block 1 changed: a flipped byte in KEY's
    shard, or the file cut short."""
    shutil.copytree(path, out)
    file = out / "block.1.rank00001.safetensors"
    if how == "flip":
        (shard,) = [s for s in read_manifest(out)["tensors"][KEY]["shards"] if s["rank"] == 1]
        data = bytearray(file.read_bytes())
        data[shard["offset"] + 5] ^= 0x40
        file.write_bytes(bytes(data))
    else:
        file.write_bytes(file.read_bytes()[:-100])
    return out


@pytest.mark.parametrize(("how", "message"), [("flip", "crc32 mismatch"), ("cut", "file truncated")])
def test_verify_and_load_name_a_corrupt_shard(
    how: str,
    message: str,
    saved: tuple[Path, list[float]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = corrupt(saved[0], tmp_path / "step_000002", how)
    problems = verify(path)
    assert problems and {p.file for p in problems} == {"block.1.rank00001.safetensors"}
    assert message in problems[0].message and problems[0].tensor is not None
    if how == "flip":
        assert [p.tensor for p in problems] == [KEY]
    assert cli(["ckpt", "verify", str(path)]) == 1
    assert (
        f"BAD {path / 'block.1.rank00001.safetensors'}: {problems[0].tensor}: {message}"
        in capsys.readouterr().out
    )
    model, opt = wrap_one()
    with pytest.raises(CheckpointCorrupt, match=rf"block\.1\.rank00001\.safetensors: tensor '.+': {message}"):
        offload.load(model, opt, path)
    model.runtime.close()


def test_export_and_diff_put_the_shards_together(
    saved: tuple[Path, list[float]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same state saved by one process (whole tensors, format version 1): the exports are
    bitwise equal, diff finds no difference in any tensor, inspect shows the shards."""
    path, _ = saved
    model, opt = wrap_one()
    offload.load(model, opt, path)
    one = offload.save(model, opt, tmp_path / "one", step=2).wait()
    model.runtime.close()
    assert read_manifest(one)["format_version"] == 1 and "ranks" not in read_manifest(one)
    a = load_file(str(export_hf(path, tmp_path / "hf2") / "model.safetensors"))
    b = load_file(str(export_hf(one, tmp_path / "hf1") / "model.safetensors"))
    assert sorted(a) == sorted(b)  # the order follows the order the records were written in
    for k in b:
        assert torch.equal(a[k], b[k]), k
    found = diff(path, one)
    assert len(found) == len(read_manifest(one)["tensors"])
    assert all(d.max_abs == 0.0 and not d.note for d in found)
    assert cli(["ckpt", "inspect", str(path), "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert "saved by 2 ranks" in out
    tensors = read_manifest(path)["tensors"]
    assert {len(t["shards"]) for k, t in tensors.items() if k.startswith("master/model.layers")} == {1, 2}
    for key, entry in tensors.items():
        row = next(line.split() for line in out.splitlines() if line.startswith(f"{key} "))
        if "shards" in entry:  # a parameter in one rank's shard has one, one across the boundary two
            files = re.sub(r"rank\d{5}", "rank*", entry["shards"][0]["file"])
            assert row[1:4] == [files, f"({len(entry['shards'])}", "shards)"], key
        else:
            assert row[1] == "resident.safetensors"


def test_a_corrupt_shard_fails_the_load_on_every_rank(
    saved: tuple[Path, list[float]], tmp_path: Path
) -> None:
    """Only rank 1 reads rank 1's file at 2 ranks; rank 0 must refuse the checkpoint too."""
    path = corrupt(saved[0], tmp_path / "ckpt" / "step_000002", "flip")
    out = tmp_path / "run"
    out.mkdir()
    ranks(2, {"out": str(out), "steps": 3, "load": str(path), "start": 2})
    for rank in range(2):
        outcome = json.loads((out / f"outcome.{rank}.json").read_text())
        assert outcome["load"].startswith("CheckpointCorrupt"), rank
        assert f"block.1.rank00001.safetensors: tensor '{KEY}': crc32 mismatch" in outcome["load"]


def test_a_failure_on_rank_1_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    """EIO on rank 1's writes of step 2: both ranks' wait() raise, step 1 stays committed and named
    by latest, nothing of step 2 is left, and the next save works."""
    out = tmp_path / "run"
    out.mkdir()
    ranks(2, {"out": str(out), "steps": 3, "saves": [1, 2, 3], "fail": {"rank": 1, "step": 2}})
    outcome = [json.loads((out / f"outcome.{r}.json").read_text()) for r in range(2)]
    assert outcome[1]["save.2"].startswith("OSError") and "injected" in outcome[1]["save.2"]
    assert outcome[0]["save.2"].startswith("CheckpointError")
    assert "rank 1 failed: OSError" in outcome[0]["save.2"]
    assert all("save.1" not in o and "save.3" not in o for o in outcome)
    root = out / "ckpt"
    assert [s for s, _ in list_checkpoints(root)] == [1, 3]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    assert verify(root / "step_000001") == []
    model, opt = wrap_one()
    offload.load(model, opt, root / "step_000001")
    model.runtime.close()


def test_prune_before_writes_each_ranks_files_over_the_surplus_step(tmp_path: Path) -> None:
    """keep_last=1, prune="before", three saves in a row: each after the first writes every
    rank's files over the previous step's, and the last loads bitwise."""
    out = tmp_path / "run"
    out.mkdir()
    ranks(2, {"out": str(out), "steps": 3, "saves": [1, 2, 3], "keep_last": 1, "prune": "before"})
    root = out / "ckpt"
    assert [s for s, _ in list_checkpoints(root)] == [3]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]
    for rank in range(2):
        reused = json.loads((out / f"outcome.{rank}.json").read_text())["reused"]
        assert reused[0] == 0 and reused[1] > 0 and reused[2] > 0, rank
    at_save = load_file(str(out / "state.safetensors"))
    model, opt = wrap_one()
    offload.load(model, opt, root)
    loaded = offload.state_dict(model)
    model.runtime.close()
    assert sorted(loaded) == sorted(at_save)
    for k, v in at_save.items():
        assert torch.equal(loaded[k], v), k


# ---- the ranks' worker ----------------------------------------------------------------------------


def ranks(world: int, spec: dict[str, Any]) -> None:
    run_ranks(world, __file__, json.dumps(spec))


class FailedWrite:
    """An io future whose write failed with EIO."""

    def wait(self, timeout: float | None = None) -> int:
        raise OSError(errno.EIO, "Input/output error (injected)")


def failing_writes(rank: int) -> Any:
    """Makes every write of this rank's shard files fail; returns the undo."""
    real = offload.io.DirectFile.write_from

    def write_from(f: Any, buf: Any, offset: int = 0, nbytes: int | None = None) -> Any:
        if f.path.endswith(f"rank{rank:05d}.safetensors"):
            return FailedWrite()
        return real(f, buf, offset, nbytes)

    offload.io.DirectFile.write_from = write_from  # type: ignore[method-assign]
    return lambda: setattr(offload.io.DirectFile, "write_from", real)


def worker(spec: dict[str, Any]) -> None:
    """One rank: optionally load, train steps start .. steps - 1 (global batches of 4 split over
    the ranks), save after the steps listed; record each rank's outcome, rank 0 the final state."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(spec["out"])
    outcome: dict[str, Any] = {"reused": []}
    try:
        model, opt = wrap_one()
        per = 4 // world
        start = spec.get("start", 0)
        if "load" in spec:
            try:
                offload.load(model, opt, spec["load"])
            except Exception as e:
                outcome["load"] = f"{type(e).__name__}: {e}"
                return
        for step in range(start, spec["steps"]):
            ids = batches(1, batch=4, seed=100 + step)[0][rank * per : (rank + 1) * per]
            run_steps(model, opt, 1, 1, lambda _s, _m, ids=ids: ids)
            if step + 1 not in spec.get("saves", []):
                continue
            fail = spec.get("fail")
            undo = failing_writes(rank) if fail == {"rank": rank, "step": step + 1} else None
            try:
                handle = offload.save(
                    model,
                    opt,
                    out / "ckpt",
                    step=step + 1,
                    keep_last=spec.get("keep_last"),
                    prune=spec.get("prune", "after"),
                )
                handle.wait()
                outcome["reused"].append(handle.stats.reused_bytes)
            except Exception as e:
                outcome[f"save.{step + 1}"] = f"{type(e).__name__}: {e}"
            finally:
                if undo is not None:
                    undo()
        state = offload.state_dict(model)  # a collective: every rank takes part
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / "state.safetensors"))
    finally:
        (out / f"outcome.{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
