"""``offload train``: the embedded default recipe end to end (shortened), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from offload.cli.main import main

TINY = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml")


def test_tiny_recipe_trains_and_writes_a_loadable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            TINY,
            "--set",
            "train.steps=6",
            "--set",
            "train.log_every=2",
            "--set",
            "train.schedule.warmup_steps=2",
            "--set",
            f"train.output_dir={out}",
            "--trace",
            str(tmp_path / "trace.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "trained 6 steps" in printed.out and "step 6/6" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any(e["name"] == "adamw" for e in events)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], saved["model.layers.0.mlp.up_proj.weight"]
    )


def test_missing_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_override_names_the_field(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", TINY, "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "unknown field" in err


def test_bad_value_names_the_field(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", TINY, "--set", "offload.dtype=float8"]) == 2
    assert "offload.dtype" in capsys.readouterr().err
