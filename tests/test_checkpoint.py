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
from offload.checkpoint.export import export_hf
from offload.cli import CliError, ckpt
from offload.store.tiers import NvmeTier
from tests.models import batches, tiny

STEPS = 6
OPT = {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5}


def make(schedule: bool = False, **overrides: Any) -> tuple[Any, Any, Any]:
    model, opt = offload.wrap(
        tiny("llama"), **{"device": "cpu", "dtype": "float32", "optimizer": OPT, **overrides}
    )
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
    assert handle.wait() == handle.path == tmp / "ckpt" / "step_000003" and handle.done()
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


def test_masters_on_nvme_resume_and_load_on_host(tmp_path: Path, disk_dir: Path) -> None:
    """Two of four blocks keep master, m and v in their files: the checkpoint reads the masters
    from the tier and loads them back into another placement."""
    spilled = {
        "dtype": "bfloat16",
        "placement": {"optimizer_state": "nvme", "master": "nvme", "spill_blocks": 2},
        "nvme_dirs": [str(disk_dir / "state")],
    }
    resumed(tmp_path / "a", spilled, spilled)
    resumed(tmp_path / "b", spilled, {"dtype": "bfloat16"})


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
        save(model, opt, tmp_path / "ckpt", step=step).wait()
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


# ---- retention --------------------------------------------------------------------------------


def steps_of(root: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(root)]


def test_save_prunes_by_retention(tmp_path: Path) -> None:
    model, opt, _ = make()
    root = tmp_path / "ckpt"
    for step in range(1, 8):
        save(model, opt, root, step=step, keep_last=2, keep_every=3).wait()
        assert steps_of(root)[-1] == step  # never the one just written
    assert steps_of(root) == [3, 6, 7]
    assert (root / "latest").read_text() == "step_000007\n"
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    save(model, opt, root, step=8, keep_last=1).wait()
    assert steps_of(root) == [8]
    model.runtime.close()


def test_retention_refuses_bad_values(tmp_path: Path) -> None:
    from offload.checkpoint import Retention

    with pytest.raises(ValueError, match="keep_last = 0"):
        Retention(keep_last=0)
    with pytest.raises(ValueError, match="keep_every = -1"):
        Retention(keep_last=1, keep_every=-1)
    model, opt, _ = make()
    with pytest.raises(ValueError, match="keep_every = 5 needs keep_last"):
        save(model, opt, tmp_path, step=1, keep_every=5)
    with pytest.raises(ValueError, match="keep_last = 0"):
        save(model, opt, tmp_path, step=1, keep_last=0)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_prune_spares_latest(root: Path) -> None:
    from offload.checkpoint import Retention, prune

    (root / "latest").write_text("step_000001\n")  # e.g. a step rolled back to by hand
    assert prune(root, Retention(keep_last=1)) == [root / "step_000002"]
    assert steps_of(root) == [1, 3]


def test_cli_prune(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ckpt", "prune", str(root), "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would delete {root / 'step_000001'}" in out and "would delete 2 step(s)" in out
    assert steps_of(root) == [1, 2, 3]
    assert cli(["ckpt", "prune", str(root), "--keep-last", "1", "--keep-every", "2"]) == 0
    assert "deleted 1 step(s)" in capsys.readouterr().out
    assert steps_of(root) == [2, 3]
    assert cli(["ckpt", "prune", str(root), "--keep-last", "0"]) == 2
    assert "keep_last = 0" in capsys.readouterr().out


# ---- export, diff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "dtype", "atol"),
    [("llama", "float32", 1e-5), ("qwen2", "float32", 1e-5), ("qwen2", "bfloat16", 0.1)],
)
def test_export_hf_logits_match(tmp_path: Path, family: str, dtype: str, atol: float) -> None:
    """The exported directory loads in transformers and gives the offload model's logits: to float32
    rounding (the same ops on the same weights), or bfloat16's (weights rounded to 8 bits of mantissa;
    logits of this tiny model are O(1), so 0.1 absolute)."""
    from transformers import AutoModelForCausalLM

    model, opt = offload.wrap(tiny(family), device="cpu", dtype="float32", optimizer=OPT)
    train(model, opt, None, batches(2))
    path = save(model, opt, tmp_path / "ckpt", step=2).wait()
    ids = batches(1, seed=5)[0]
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    model.runtime.close()
    seen: list[tuple[int, int, str]] = []
    out = export_hf(path, tmp_path / "hf", dtype=dtype, progress=lambda *a: seen.append(a))
    assert seen[-1][0] == seen[-1][1] == len(seen)
    names = [name for _, _, name in seen]
    assert ("lm_head.weight" in names) == (family == "llama")  # tied: written once
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=getattr(torch, dtype))
    with torch.no_grad():
        got = hf(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expect, atol=atol, rtol=0)


def test_export_refusals(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype = 'int8'"):
        export_hf(root, tmp_path / "x", dtype="int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="taken already exists"):
        export_hf(root, tmp_path / "taken")
    manifest = root / "step_000003" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "model_config": None}))
    with pytest.raises(CheckpointError, match="without a Hugging Face model config"):
        export_hf(root, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_cli_export(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    assert cli(["ckpt", "export", str(root), "--to", "hf", str(out), "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    assert (
        "wrote" in captured.out
        and f"export {len(load_file(str(out / 'model.safetensors')))}/" in captured.err
    )
    weights = load_file(str(out / "model.safetensors"))
    master = load_file(str(root / "step_000003" / "block.0.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(weights[name], master[f"master/{name}"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_diff(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from offload.checkpoint.diff import diff

    same = diff(root / "step_000002", root / "step_000002")
    assert {d.max_abs for d in same} == {0.0}
    moved = {d.key: d.max_abs for d in diff(root / "step_000001", root)}
    name = "master/model.layers.0.mlp.up_proj.weight"
    a = safe_tensor(root / "step_000001", name)
    b = safe_tensor(root / "step_000003", name)
    assert moved[name] == pytest.approx((a.double() - b.double()).abs().max().item())
    assert cli(["ckpt", "diff", str(root / "step_000001"), str(root)]) == 0
    out = capsys.readouterr().out
    assert name in out and f"{len(moved)} tensors compared" in out


def test_diff_other_model(root: Path, tmp_path: Path) -> None:
    from offload.checkpoint.diff import diff

    model, opt = offload.wrap(tiny("llama", layers=2), device="cpu", dtype="float32")
    other = save(model, opt, tmp_path / "other", step=1).wait()
    model.runtime.close()
    notes = {d.key: d.note for d in diff(root, other) if d.max_abs is None}
    assert notes["master/model.layers.2.mlp.up_proj.weight"] == "only in A"
    assert len(notes) == 3 * 9  # one layer's 9 parameters, 3 tensors each


def safe_tensor(path: Path, key: str) -> torch.Tensor:
    manifest = json.loads((path / "manifest.json").read_text())
    from safetensors.torch import load_file

    return load_file(str(path / manifest["tensors"][key]["file"]))[key]
