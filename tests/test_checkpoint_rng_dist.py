"""A multi-rank checkpoint keeps every rank's RNG states (offload/checkpoint/state.py): rank r
resumes from its own when the world size is the same, and every rank from rank 0's at another.

Two gloo ranks on the CPU train a tiny GPT-2 with dropout, each on its own data and from its own
seeds, so the ranks draw different dropout masks; a run that saves, loads into a fresh wrap and
goes on must give bitwise (float32 on the CPU) the losses and weights of one that never stopped,
on every rank. This file is also the ranks' worker: the fixture starts it under torchrun.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import offload
from offload.checkpoint import state
from offload.checkpoint.format import MANIFEST
from offload.engine.dist import Collective
from tests.launch import run_ranks
from tests.models import batches, run_steps, tiny

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS, SAVE_AT = 4, 2
WRAP = {"device": "cpu", "dtype": "float32", "optimizer": {"lr": 3e-3, "weight_decay": 0.1}}


def build() -> tuple[Any, Any]:
    return offload.wrap(tiny("gpt2", layers=2, dropout=0.2), **WRAP)


def seed_rank(rank: int) -> None:
    """Each rank's generators from its own seed: the ranks' dropout masks differ."""
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)


def rank_batch(rank: int, step: int) -> torch.Tensor:
    return batches(1, batch=2, seed=100 + step * WORLD + rank)[0]


def train(model: Any, opt: Any, rank: int, first: int, last: int) -> list[float]:
    """This rank's losses (not averaged over the ranks) of steps first .. last - 1."""
    return run_steps(model, opt, last - first, 1, lambda step, _: rank_batch(rank, first + step))


def strip_per_rank(ckpt: Path, out: Path) -> None:
    """A copy of ckpt as offload wrote it before ``rng_per_rank``: rank 0's states alone."""
    shutil.copytree(ckpt, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.pop("rng_per_rank", None)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def worker(out: Path) -> None:
    """One rank: 4 steps straight; 2 steps, save, a fresh wrap, load, 2 steps; then a load of the
    checkpoint without its per-rank states. Writes what the tests compare."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        model, opt = build()
        seed_rank(rank)
        seeded = state.rng_state()
        straight = train(model, opt, rank, 0, STEPS)
        save_file(offload.state_dict(model), str(out / f"straight.{rank}.safetensors"))
        model.runtime.close()

        model, opt = build()
        seed_rank(rank)
        losses = train(model, opt, rank, 0, SAVE_AT)
        at_save = state.rng_state()
        offload.save(model, opt, out / "ckpt", step=SAVE_AT).wait()
        model.runtime.close()
        seed_rank(99)  # load must bring back this rank's states, not these
        model, opt = build()
        offload.load(model, opt, out / "ckpt")
        losses += train(model, opt, rank, SAVE_AT, STEPS)
        save_file(offload.state_dict(model), str(out / f"resumed.{rank}.safetensors"))
        model.runtime.close()

        if rank == 0:
            strip_per_rank(out / "ckpt" / f"step_{SAVE_AT:06d}", out / "legacy")
        dist.barrier()  # the copy exists before any rank loads it
        model, opt = build()
        offload.load(model, opt, out / "legacy")
        legacy = state.rng_state()
        model.runtime.close()
        record = {
            "straight": straight,
            "resumed": losses,
            "seeded": seeded,
            "at_save": at_save,
            "legacy": legacy,
        }
        (out / f"rank.{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's output on 2 ranks (one torchrun for every test of this file)."""
    out = tmp_path_factory.mktemp("rng_dist")
    run_ranks(WORLD, __file__, str(out))
    return out


def ranks_record(run: Path) -> list[dict[str, Any]]:
    return [json.loads((run / f"rank.{r}.json").read_text()) for r in range(WORLD)]


def test_two_rank_resume_with_dropout_is_exact_on_every_rank(run: Path) -> None:
    records = ranks_record(run)
    # the ranks' random streams really differ, and dropout draws from them
    assert records[0]["at_save"] != records[1]["at_save"]
    assert all(r["seeded"]["torch"] != r["at_save"]["torch"] for r in records)
    for rank, record in enumerate(records):
        assert record["resumed"] == record["straight"], f"rank {rank}"
        straight = load_file(str(run / f"straight.{rank}.safetensors"))
        resumed = load_file(str(run / f"resumed.{rank}.safetensors"))
        assert list(resumed) == list(straight)
        for k, v in straight.items():
            assert torch.equal(resumed[k], v), f"rank {rank}: {k}"
    manifest = json.loads((run / "ckpt" / f"step_{SAVE_AT:06d}" / MANIFEST).read_text())
    assert manifest["rng_per_rank"] == [r["at_save"] for r in records]
    assert manifest["rng"] == records[0]["at_save"]  # what older readers and other world sizes use


def test_two_rank_checkpoint_loads_on_one_rank_with_rank_0s_states(run: Path) -> None:
    records = ranks_record(run)
    model, opt = build()
    seed_rank(99)
    offload.load(model, opt, run / "ckpt")
    assert state.rng_state() == records[0]["at_save"]
    losses = train(model, opt, 0, SAVE_AT, STEPS)
    assert all(np.isfinite(losses))
    model.runtime.close()


def test_checkpoint_without_per_rank_states_loads_as_before(run: Path) -> None:
    """Every rank of the worker's load took rank 0's states; so does one process here."""
    records = ranks_record(run)
    assert [r["legacy"] for r in records] == [records[0]["at_save"]] * WORLD
    model, opt = build()
    seed_rank(99)
    offload.load(model, opt, run / "legacy")
    assert state.rng_state() == records[0]["at_save"]
    model.runtime.close()


def test_each_rank_takes_its_own_states_only_at_the_saved_world_size() -> None:
    per_rank = [{"torch": f"r{r}"} for r in range(3)]
    manifest = {"rng": per_rank[0], "rng_per_rank": per_rank}
    assert [state.rng_state_for(manifest, Collective(r, 3)) for r in range(3)] == per_rank
    assert [state.rng_state_for(manifest, Collective(r, 2)) for r in range(2)] == [per_rank[0]] * 2
    assert state.rng_state_for(manifest, None) == per_rank[0]
    assert state.rng_state_for({"rng": per_rank[0]}, Collective(1, 2)) == per_rank[0]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
