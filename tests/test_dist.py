"""Multi-rank training over torchrun with gloo on the CPU (offload/engine/dist.py): each rank owns
a shard of every block's state, all-gathers weights and reduce-scatters gradients. Losses and
weights must equal a 1-rank run over the same global batch within float32 rounding: the ranks'
gradients are summed in another order than one backward over the whole batch sums them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import offload
from tests.launch import run_ranks
from tests.models import batches, run_steps, tiny

REPO = Path(__file__).resolve().parents[1]


def one_rank(spec: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: the same loop in this process, every global batch on one rank."""
    wrapped, opt = offload.wrap(
        tiny(spec["family"], layers=spec.get("layers", 3)),
        device=spec.get("device", "cpu"),
        dtype="float32",
        **spec["wrap"],
    )
    losses = run_steps(
        wrapped, opt, spec["steps"], spec.get("accum", 1), lambda step, micro: global_batch(spec, step, micro)
    )
    return losses, offload.state_dict(wrapped)


def global_batch(spec: dict, step: int, micro: int) -> torch.Tensor:
    """The batch of every rank together at (step, micro): the same in the worker and here."""
    return batches(1, batch=spec["batch"], seed=100 + step * 10 + micro)[0]


def torchrun(world: int, spec: dict, out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(world, str(REPO / "tests" / "dist_worker.py"), json.dumps({**spec, "out": str(out)}))
    return json.loads((out / "losses.json").read_text()), load_file(str(out / "state.safetensors"))


def assert_matches(world: int, spec: dict, tmp_path: Path) -> None:
    expect_losses, expect = one_rank(spec)
    losses, state = torchrun(world, spec, tmp_path)
    # Each rank held its 1/world shard of every streamed block (equal shards, padded).
    held = json.loads((tmp_path / "held.json").read_text())
    for own, whole, host, planned_host, pinned, planned_pinned in held:
        assert whole / world <= own < whole / world + 64 * len(held) * spec.get("layers", 3)
        # offload plan --world-size predicts each rank's store exactly
        assert (host, pinned) == (planned_host, planned_pinned)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expect_losses), rtol=1e-5, atol=1e-6)
    assert sorted(state) == sorted(expect)  # safetensors files keep keys sorted
    for k, v in expect.items():
        # float32 rounding of differently ordered sums, amplified a little by Adam's division
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(("world", "overlap"), [(2, False), (3, True)])
def test_ranks_match_one_rank(world: int, overlap: bool, tmp_path: Path) -> None:
    spec = {
        "family": "llama",
        "batch": 6,
        "steps": 4,
        "wrap": {"optimizer": {"lr": 3e-3, "weight_decay": 0.1, "overlap_backward": overlap}},
    }
    assert_matches(world, spec, tmp_path)


def test_two_ranks_with_clipping_accumulation_device_blocks_and_tied_weights(tmp_path: Path) -> None:
    spec = {
        "family": "qwen2",
        "batch": 4,
        "steps": 3,
        "accum": 2,
        "wrap": {"optimizer": {"lr": 3e-3, "max_grad_norm": 0.05}, "placement": {"device_blocks": 1}},
    }
    assert_matches(2, spec, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_match_one_gpu(tmp_path: Path) -> None:
    """NCCL: the all-gather and reduce-scatter run on the engine's side streams."""
    spec = {
        "family": "llama",
        "device": "cuda",
        "batch": 4,
        "steps": 4,
        "wrap": {"optimizer": {"lr": 3e-3, "overlap_backward": True}, "placement": {"device_blocks": 1}},
    }
    assert_matches(2, spec, tmp_path)


def test_checkpoint_saved_at_one_world_size_loads_at_another(tmp_path: Path) -> None:
    """Saved by 2 ranks (each writes its shards' files, tests/test_checkpoint_ranks.py), loaded
    by 3 ranks and by 1: the steps after the checkpoint equal the run that went straight on."""
    spec = {
        "family": "llama",
        "batch": 6,
        "steps": 4,
        "wrap": {"optimizer": {"lr": 3e-3, "weight_decay": 0.1}},
    }
    straight_losses, straight = torchrun(2, {**spec, "save_at": 2}, tmp_path / "two")
    ckpt = tmp_path / "two" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_000002"
    resumed = {**spec, "start": 2, "load": str(ckpt)}
    losses, state = torchrun(3, resumed, tmp_path / "three")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight_losses[2:]), rtol=1e-5, atol=1e-6)
    for k, v in straight.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # and into a single process
    wrapped, opt = offload.wrap(tiny("llama"), device="cpu", dtype="float32", **spec["wrap"])
    offload.load(wrapped, opt, ckpt)
    one = run_steps(wrapped, opt, 2, 1, lambda step, micro: global_batch(spec, 2 + step, micro))
    torch.testing.assert_close(torch.tensor(one), torch.tensor(straight_losses[2:]), rtol=1e-5, atol=1e-6)


def test_a_save_rank_0_cannot_start_fails_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone touches the disk; when its save() fails (the root is a file), the other rank
    must not wait for it in the writers' collectives: both get an error, training goes on."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    spec = {"family": "llama", "batch": 4, "steps": 3, "save_at": 2, "save_root": str(blocker / "ckpt")}
    torchrun(2, {**spec, "wrap": {}}, tmp_path / "run")
    errors = {p.name: p.read_text() for p in (tmp_path / "run").glob("save_error.*")}
    assert sorted(errors) == ["save_error.0", "save_error.1"]
    assert errors["save_error.0"].startswith(("FileExistsError", "NotADirectoryError"))
    assert "another rank could not start this save" in errors["save_error.1"]


def test_two_ranks_with_state_on_nvme_and_activations_on_the_host(tmp_path: Path) -> None:
    """The tiers hold each rank's shards: spilled m and v in this rank's files, boundary states in
    host memory; the numbers stay those of one rank."""
    (tmp_path / "nvme").mkdir()
    spec = {
        "family": "llama",
        "batch": 4,
        "steps": 3,
        "wrap": {
            "optimizer": {"lr": 3e-3},
            "placement": {"optimizer_state": "nvme", "spill_blocks": 2, "activations": "host"},
            "nvme_dirs": [str(tmp_path / "nvme")],
        },
    }
    assert_matches(2, spec, tmp_path / "run")


@pytest.mark.skipif(
    not Path("/sys/devices/system/node/node0").is_dir(), reason="kernel exposes no NUMA nodes"
)
def test_two_ranks_with_m_v_and_gradient_sums_on_cxl(tmp_path: Path) -> None:
    """Node 0 stands in for CXL memory: each rank binds its shards' m and v and its gradient sums
    (accumulating 2 micro-batches) there; the numbers stay those of one rank, and the plan predicts
    each rank's host store."""
    spec = {
        "family": "llama",
        "batch": 4,
        "steps": 3,
        "accum": 2,
        "wrap": {
            "optimizer": {"lr": 3e-3},
            "placement": {"optimizer_state": "cxl", "gradients": "cxl", "spill_blocks": 2},
            "cxl_nodes": [0],
        },
    }
    assert_matches(2, spec, tmp_path / "run")


@pytest.mark.parametrize("overlap", [False, True])
def test_two_ranks_with_gradient_sums_on_the_device(overlap: bool, tmp_path: Path) -> None:
    """placement.gradients gpu: each rank sums its reduce-scattered shard of every micro-batch's
    gradient on the compute device (here the CPU) and sends the sum to host at step() (with
    overlap_backward, as each block's backward ends); the numbers stay those of one rank, and the
    plan predicts each rank's host store and pinned pool (fp32 gradient shards)."""
    spec = {
        "family": "llama",
        "batch": 4,
        "steps": 3,
        "accum": 1 if overlap else 3,
        "wrap": {
            "optimizer": {"lr": 3e-3, "max_grad_norm": None if overlap else 0.5, "overlap_backward": overlap},
            "placement": {"gradients": "gpu"},
        },
    }
    assert_matches(2, spec, tmp_path / "run")
