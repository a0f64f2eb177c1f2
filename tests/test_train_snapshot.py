"""``offload train`` with ``train.snapshot``: a run interrupted after step 3 and started again
restores its step-3 snapshot from the keeper and continues exactly as a run that never stopped
(float32 on the CPU: losses and final weights bitwise). Each test's keepers live under a scratch
directory of their own and are killed after it (tests/keepers.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offload.cli.main import main
from tests.keepers import remove, scratch
from tests.test_train_cli import TINY, Interrupt, short


@pytest.fixture
def keepers() -> Iterator[Path]:
    base = scratch()
    try:
        yield base
    finally:
        remove(base)


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
