"""Checkpoints: exact resume, placement independence, atomic commit, corruption, and the CLI.

Resume is compared bitwise (float32 on the CPU): a run that saves, loads into a new wrap and goes
on must produce the very same losses and weights as one that never stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import offload
from offload.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointNotFound,
    list_checkpoints,
    load,
    resolve,
    save,
    verify,
)
from offload.cli import CliError, ckpt
from offload.store.tiers import NvmeTier
from tests.models import batches, tiny

STEPS = 6
OPT = {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5}


def make(schedule: bool = False, **overrides: Any) -> tuple[Any, Any, Any]:
    model, opt = offload.wrap(tiny("llama"), device="cpu", dtype="float32", optimizer=OPT, **overrides)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i)) if schedule else None
    return model, opt, sched


def train(model: Any, opt: Any, sched: Any, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_placed(model: Any, overrides: dict[str, Any]) -> None:
    """The run really has the placement the test is about."""
    rt = model.runtime
    placement = overrides.get("placement", {})
    assert isinstance(rt.state_tier, NvmeTier) == (placement.get("optimizer_state") == "nvme")
    assert sum(r.on_device for r in rt.blocks) == placement.get("device_blocks", 0)


def resumed(tmp: Path, first: dict[str, Any], second: dict[str, Any], schedule: bool = False) -> None:
    """6 steps straight (placement first) against 3 + save + load into a new wrap (placement
    second) + 3: bitwise the same losses and weights."""
    data = batches(STEPS)
    model, opt, sched = make(schedule, **first)
    straight = train(model, opt, sched, data)
    expect = offload.state_dict(model)
    model.runtime.close()

    model, opt, sched = make(schedule, **first)
    assert_placed(model, first)
    losses = train(model, opt, sched, data[:3])
    handle = save(model, opt, tmp / "ckpt", step=3, scheduler=sched, extra={"data": {"index": 3}})
    assert handle.done() and handle.wait() == handle.path == tmp / "ckpt" / "step_000003"
    model.runtime.close()

    torch.manual_seed(999)  # load restores the generator state the save saw
    model, opt, sched = make(schedule, **second)
    assert_placed(model, second)
    assert load(model, opt, tmp / "ckpt", scheduler=sched) == {"data": {"index": 3}}
    losses += train(model, opt, sched, data[3:])
    assert losses == straight
    assert_same_state(offload.state_dict(model), expect)
    model.runtime.close()


def test_exact_resume(tmp_path: Path) -> None:
    resumed(tmp_path, {}, {})


def test_exact_resume_with_scheduler(tmp_path: Path) -> None:
    resumed(tmp_path, {}, {}, schedule=True)


def test_exact_resume_with_nvme_optimizer_state(tmp_path: Path, disk_dir: Path) -> None:
    nvme = {"placement": {"optimizer_state": "nvme"}, "nvme_dirs": [str(disk_dir / "state")]}
    resumed(tmp_path, nvme, nvme)


def test_host_checkpoint_loads_with_device_blocks(tmp_path: Path) -> None:
    resumed(tmp_path, {}, {"placement": {"device_blocks": 2}})


def test_nvme_checkpoint_loads_on_host(tmp_path: Path, disk_dir: Path) -> None:
    nvme = {"placement": {"optimizer_state": "nvme"}, "nvme_dirs": [str(disk_dir / "state")]}
    resumed(tmp_path, nvme, {})


def test_load_restores_hyperparameters_and_rng(tmp_path: Path) -> None:
    model, opt, _ = make()
    opt.param_groups[0]["lr"] = 1e-4
    opt.param_groups[0]["betas"] = (0.8, 0.9)
    torch.manual_seed(7)
    path = save(model, opt, tmp_path, step=0).wait()
    draw = torch.rand(3)
    model2, opt2, _ = make()
    load(model2, opt2, path)
    assert opt2.param_groups[0]["lr"] == 1e-4 and opt2.param_groups[0]["betas"] == (0.8, 0.9)
    assert torch.equal(torch.rand(3), draw)


# ---- commit, latest ---------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with steps 1, 2 and 3 of a tiny run."""
    model, opt, _ = make()
    for step, ids in enumerate(batches(3), start=1):
        train(model, opt, None, [ids])
        save(model, opt, tmp_path / "ckpt", step=step)
    model.runtime.close()
    return tmp_path / "ckpt"


def test_latest_names_the_newest_step(root: Path) -> None:
    assert (root / "latest").read_text() == "step_000003\n"
    assert [s for s, _ in list_checkpoints(root)] == [1, 2, 3]
    assert resolve(root) == root / "step_000003"
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # nothing left behind


def test_unfinished_directories_are_not_checkpoints(root: Path) -> None:
    tmp = root / "step_000009.tmp-abc"
    tmp.mkdir()
    (tmp / "manifest.json").write_text((root / "step_000003" / "manifest.json").read_text())
    (root / "step_000003" / "manifest.json").unlink()  # as if the manifest never landed
    assert [s for s, _ in list_checkpoints(root)] == [1, 2]
    assert resolve(root) == root / "step_000002"  # latest names an uncommitted step: newest committed


def test_root_without_committed_checkpoint(root: Path) -> None:
    for _, p in list_checkpoints(root):
        (p / "manifest.json").unlink()
    assert list_checkpoints(root) == []
    model, opt, _ = make()
    with pytest.raises(CheckpointNotFound, match="no committed checkpoint"):
        load(model, opt, root)


def test_save_refuses_an_existing_step_and_non_json_extra(root: Path) -> None:
    model, opt, _ = make()
    with pytest.raises(FileExistsError, match="step_000003 already exists"):
        save(model, opt, root, step=3)
    with pytest.raises(ValueError, match="extra must be plain JSON data"):
        save(model, opt, root, step=4, extra={"t": torch.zeros(1)})
    assert not (root / "step_000004").exists() and not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_load_refuses_another_model(root: Path) -> None:
    model, opt = offload.wrap(tiny("llama", layers=2), device="cpu", dtype="float32")
    with pytest.raises(
        CheckpointError, match=r"does not fit this model.*not in the model: \['model\.layers\.2"
    ):
        load(model, opt, root)


def test_files_are_plain_safetensors(root: Path) -> None:
    from safetensors.torch import load_file

    manifest = json.loads((root / "step_000001" / "manifest.json").read_text())
    tensors = load_file(str(root / "step_000001" / "block.0.safetensors"))
    key = "master/model.layers.0.self_attn.q_proj.weight"
    assert tensors[key].shape == (48, 48) and manifest["tensors"][key]["file"] == "block.0.safetensors"
    assert manifest["config"]["device"] == "cpu" and manifest["model_config"]["hidden_size"] == 48


# ---- corruption -------------------------------------------------------------------------------

KEY = "exp_avg/model.layers.1.mlp.up_proj.weight"


def entry(path: Path, key: str = KEY) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())["tensors"][key]


def test_flipped_byte_names_file_and_tensor(root: Path) -> None:
    path = root / "step_000003"
    e = entry(path)
    with open(path / e["file"], "r+b") as f:
        f.seek(e["offset"] + e["nbytes"] // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    problems = verify(path)
    assert [(p.file, p.tensor) for p in problems] == [("block.1.safetensors", KEY)]
    assert "crc32" in problems[0].message
    model, opt, _ = make()
    with pytest.raises(CheckpointCorrupt, match=rf"block\.1\.safetensors: tensor '{KEY}': crc32"):
        load(model, opt, root)


def test_truncated_file_names_file_and_tensor(root: Path) -> None:
    path = root / "step_000003"
    e = entry(path)
    with open(path / e["file"], "r+b") as f:
        f.truncate(e["offset"] + 8)
    problems = verify(path)
    assert problems and all(p.file == "block.1.safetensors" for p in problems)
    assert problems[0].tensor == KEY and "truncated" in problems[0].message
    model, opt, _ = make()
    with pytest.raises(CheckpointCorrupt, match=rf"block\.1\.safetensors: tensor '{KEY}': file truncated"):
        load(model, opt, path)


def test_missing_file_and_bad_manifest(root: Path) -> None:
    path = root / "step_000002"
    (path / "block.0.safetensors").unlink()
    assert {(p.file, p.message) for p in verify(path)} == {("block.0.safetensors", "file missing")}
    (path / "manifest.json").write_text("{not json")
    [p] = verify(path)
    assert p.file == "manifest.json" and "not valid JSON" in p.message


# ---- CLI --------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="offload")
    ckpt.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"offload: error: {e}")
        return 2


def test_cli_ls(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ckpt", "ls", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["1", "2", "3"]
    assert lines[-1].rstrip().endswith("latest") and "KiB" in lines[-1]
    assert cli(["ckpt", "ls", str(root / "nope")]) == 2


def test_cli_inspect(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ckpt", "inspect", str(root), "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "LlamaForCausalLM" in out and "lr=0.003" in out
    [row] = [ln.split() for ln in out.splitlines() if ln.startswith(KEY + " ")]
    assert row == [KEY, "block.1.safetensors", "F32", "96x48", str(96 * 48 * 4)]


def test_cli_verify(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ckpt", "verify", str(root / "step_000001")]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    path = root / "step_000001"
    e = entry(path)
    with open(path / e["file"], "r+b") as f:
        f.truncate(e["offset"] + 8)
    assert cli(["ckpt", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {path / 'block.1.safetensors'}: {KEY}: file truncated" in out
    assert cli(["ckpt", "verify", str(root / "missing")]) == 2
    assert cli(["ckpt"]) == 2
