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
    # The run against its plan: the pinned pool and the nvme files exactly, the peak RSS reported.
    figures = summary["plan_vs_measured"]
    assert figures["pinned"]["ratio"] == figures["nvme state"]["ratio"] == 1.0
    assert figures["host peak RSS"]["measured"] > 0
    assert "plan vs measured (measured/predicted): pinned " in printed.out
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


def test_a_recipe_over_its_budgets_names_the_tier(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "train",
        TINY,
        "--set",
        "offload.budgets.host_bytes=1MiB",
        "--set",
        f"train.output_dir={tmp_path}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit the budgets" in err and "host: needs" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists()


# ---- checkpoints and --resume -------------------------------------------------------------------

SHORT = [
    "--set",
    "train.batch_size=2",
    "--set",
    "train.seq_len=64",
    "--set",
    "train.schedule.warmup_steps=2",
    "--set",
    "train.log_every=1",
]


def short(out: Path, *more: str) -> list[str]:
    """The tiny recipe, 6 steps of a smaller batch, writing under out."""
    return [
        *SHORT,
        "--set",
        "train.steps=6",
        "--set",
        f"train.output_dir={out}",
        "--set",
        f"train.checkpoint_dir={out / 'ckpt'}",
        *more,
    ]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A straight 6-step run, and one interrupted after step 3 (its step-3 checkpoint committed)."""
    from offload.cli._recipe import read_recipe
    from offload.cli.main import build_parser
    from offload.train.trainer import train

    base = tmp_path_factory.mktemp("runs")
    assert main(["train", TINY, *short(base / "straight")]) == 0

    def stop_after_3(line: str) -> None:
        if line.startswith("step 3/"):
            raise Interrupt  # as a Ctrl-C would, right after step 3's save started

    args = build_parser().parse_args(["train", TINY, *short(base / "cut", "--set", "train.save_every=3")])
    with pytest.raises(Interrupt):
        train(read_recipe(args), log=stop_after_3)
    return {"straight": base / "straight", "cut": base / "cut"}


def test_resume_is_exact(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """6 steps straight == 3 steps, interrupted, then --resume for 3 more: losses and weights."""
    from safetensors.torch import load_file

    from offload.checkpoint import list_checkpoints

    cut = runs["cut"]
    assert [s for s, _ in list_checkpoints(cut / "ckpt")] == [3]  # committed before the error went up
    capsys.readouterr()
    assert main(["train", TINY, *short(cut, "--set", "train.save_every=3"), "--resume"]) == 0
    printed = capsys.readouterr()
    assert f"resuming from {cut / 'ckpt' / 'step_000003'} (step 3)" in printed.err
    assert "checkpoint step_000006: " in printed.err and "GB/s), stall " in printed.err
    assert "trained 3 steps (resumed after step 3)" in printed.out and "1 checkpoint(s)" in printed.out
    straight = json.loads((runs["straight"] / "summary.json").read_text())
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["start_step"] == 3 and resumed["losses"] == straight["losses"][3:]
    a = load_file(str(runs["straight"] / "model.safetensors"))
    b = load_file(str(cut / "model.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in list_checkpoints(cut / "ckpt")] == [3, 6]


def test_prune_before_writes_each_checkpoint_over_the_last(runs: dict[str, Path], tmp_path: Path) -> None:
    """train.prune before with keep_last 1: each save writes over the files of the checkpoint it
    replaces; one committed checkpoint at the end, no leftovers, and training unchanged."""
    from offload.checkpoint import list_checkpoints, verify

    out = tmp_path / "recycled"
    more = ["--set", "train.save_every=2", "--set", "train.keep_last=1", "--set", "train.prune=before"]
    assert main(["train", TINY, *short(out, *more)]) == 0
    found = list_checkpoints(out / "ckpt")
    assert [s for s, _ in found] == [6] and verify(found[0][1]) == []
    assert [p.name for p in (out / "ckpt").iterdir() if ".tmp-" in p.name] == []
    straight = json.loads((runs["straight"] / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["losses"] == straight["losses"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ["--set", "train.batch_size=4"],
            "saved by a different recipe: train.global_batch_size: checkpoint 2, recipe 4",
        ),
        (["--set", "model.num_layers=2"], "model.num_layers: checkpoint 4, recipe 2"),
        (["--set", "offload.optimizer.lr=0.1"], "offload.optimizer.lr: checkpoint 0.003, recipe 0.1"),
    ],
)
def test_resume_refuses_another_recipe(
    runs: dict[str, Path], tmp_path: Path, change: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    ckpt = runs["straight"] / "ckpt"
    before = sorted(p.name for p in ckpt.iterdir())
    argv = ["train", TINY, *short(tmp_path, *change, "--set", "train.steps=8"), "--resume", str(ckpt)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing touched
    assert not (tmp_path / "summary.json").exists()


def test_resume_errors(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", TINY, *short(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume from: " in capsys.readouterr().err
    done = runs["straight"] / "ckpt"
    assert main(["train", TINY, *short(tmp_path / "x"), "--resume", str(done)]) == 2
    assert "is at step 6, already at train.steps = 6: raise train.steps" in capsys.readouterr().err

    import offload
    from tests.models import tiny

    model, opt = offload.wrap(tiny("llama"), device="cpu", dtype="float32")
    foreign = offload.save(model, opt, tmp_path / "foreign", step=1).wait()
    model.runtime.close()
    assert main(["train", TINY, *short(tmp_path / "y"), "--resume", str(foreign)]) == 2
    assert "was not saved by offload train" in capsys.readouterr().err


def test_checkpoint_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "blocked").write_text("")
    argv = ["train", TINY, *SHORT, "--set", "train.steps=2", "--set", f"train.output_dir={tmp_path}"]
    assert main([*argv, "--set", f"train.checkpoint_dir={tmp_path / 'blocked'}"]) == 2
    assert f"cannot save the checkpoint of step 2 in {tmp_path / 'blocked'}" in capsys.readouterr().err


def test_auto_keeps_are_logged_and_summarized(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """offload_saved auto in a run: its decision is logged when made (step 3) and again when its
    step is measured (step 5), and summary.json holds it."""
    out = tmp_path / "auto"
    assert main(["train", TINY, *short(out, "--set", "offload.placement.offload_saved=auto")]) == 0
    err = capsys.readouterr().err
    told = [line for line in err.splitlines() if "offload_saved auto: " in line]
    summary = json.loads((out / "summary.json").read_text())["offload_saved"]
    assert summary is not None and len(summary["keep"]) > 0
    if summary["blocks"] or summary["reverted"]:  # it kept something: decided, then measured
        assert len(told) == 2 and summary["measured_step_s"] > 0
        assert ("measured" in told[1]) and ("est. step" in told[0] and "measured" not in told[0])
    else:  # nothing paid: one line, saying why
        assert len(told) == 1 and told[0].endswith(summary["reason"] or ")")
