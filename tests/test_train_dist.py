"""``offload train --nproc N``: the recipe on N gloo ranks through torchrun (offload/train/ranks.py),
each rank reading its own share of every global batch, equals one rank reading the whole batch
within float32 rounding; rank 0 alone reports and writes the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offload.cli.main import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "recipes" / "tiny.yaml")


def recipe_args(out: Path, batch: int) -> list[str]:
    sets = {
        "train.steps": "4",
        "train.batch_size": str(batch),
        "train.seq_len": "64",
        "train.schedule.warmup_steps": "1",
        "train.log_every": "1",
        "train.output_dir": str(out),
        "offload.dtype": "float32",
    }
    return [TINY, *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]


def test_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path: Path) -> None:
    assert main(["train", *recipe_args(tmp_path / "one", batch=4)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "offload.cli.main",
        "train",
        *recipe_args(tmp_path / "two", batch=2),
        "--nproc",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 4 steps") == 1  # rank 0 reports, once
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["tokens"] == one["tokens"]  # the global batch: 2 ranks x 2 rows = 4 rows
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_nproc_must_be_positive(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", TINY, "--nproc", "0"]) == 2
    assert "--nproc 0: must be >= 1" in capsys.readouterr().err


def test_two_ranks_resume_from_a_one_rank_checkpoint(tmp_path: Path) -> None:
    """A checkpoint written by one rank at step 2 resumes on two ranks (the store re-sharded)
    and the remaining steps equal the run that went straight on."""
    straight = tmp_path / "straight"
    assert main(["train", *recipe_args(straight, batch=4), "--set", "train.save_every=2"]) == 0
    ckpt = straight / "checkpoints" / "step_000002"
    assert ckpt.is_dir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    resumed = [
        *recipe_args(tmp_path / "resumed", batch=2),
        "--set",
        "train.save_every=2",
        "--resume",
        str(ckpt),
    ]
    cmd = [sys.executable, "-m", "offload.cli.main", "train", *resumed, "--nproc", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((straight / "summary.json").read_text())
    two = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert two["start_step"] == 2
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(one["losses"][2:]), rtol=1e-5, atol=1e-6
    )
