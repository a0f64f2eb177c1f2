"""One rank of a snapshot test run under torchrun (tests/test_snapshot_dist.py launches it).

Each rank is its own "node": its keeper lives in ``<keepers>/node<rank>``. Two phases:

- ``reference``: trains ``steps`` steps straight, snapshotting after each of the first ``snap_until``
  (lazily: the snapshot of step N is captured while step N+1 trains), writes the global losses of
  every step and (rank 0) the final weights; then rank ``victim`` kills itself with SIGKILL, as a
  crashed trainer, once every rank is done.
- ``resume``: restores (keepers, parity or disk, whatever is left), trains to ``steps``, writes
  the losses of the steps it ran, the final weights and each rank's Restored. With ``fail``
  ({"rank": r, "at": where}), rank r's restore is made to fail at where (``inject``); every rank
  whose restore raises writes its error and waits until every rank has written its outcome
  before it raises (torchrun ends the others as soon as one exits with an error).

``snapshot`` (optional) holds SnapshotConfig fields to override (a short ``timeout_s``).

A tiny model without transformers (importing it would triple the start-up time of each rank), with
dropout, so that the RNG states must come back too. float32 on the CPU, one thread: bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import offload
from offload.snapshot import SnapshotConfig, Snapshotter


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(torch.relu(self.up(self.norm(x)))))


class Net(nn.Module):
    def __init__(self, d: int = 24, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(layers))
        self.out = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return nn.functional.mse_loss(self.out(h).squeeze(-1), y)


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(2 * world, 6, generator=g), torch.randn(2 * world, generator=g)
    return x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2]


def inject(at: str) -> None:
    """Makes this rank's restore fail at ``at``: reading its keeper ("status"), loading its payload
    ("load"), decoding a lost chunk ("rebuild": one wrong byte, so its crc32 fails), loading its
    flushed snapshot ("disk"); or its Snapshotter fail to reach its keeper ("connect")."""
    from offload.snapshot import codec, recovery
    from offload.snapshot.flush import FlushError
    from offload.snapshot.keeper import KeeperError
    from offload.snapshot.payload import SnapshotMismatch

    def fail(error: Exception) -> Callable[..., Any]:
        def raise_it(*args: Any, **kwargs: Any) -> Any:
            raise error

        return raise_it

    decode = codec.decode

    def wrong(*args: Any, **kwargs: Any) -> Any:
        got = decode(*args, **kwargs)
        for chunk in kwargs["out"]:
            if chunk is not None:
                chunk[:1].bitwise_xor_(1)
        return got

    if at == "connect":
        from offload.snapshot import snapshotter

        class Unreachable:
            @staticmethod
            def connect(*args: Any, **kwargs: Any) -> Any:
                raise KeeperError("injected: no keeper answers here")

        snapshotter.KeeperClient = Unreachable  # type: ignore[assignment,misc]
    elif at == "status":
        recovery._status = fail(KeeperError("injected: the keeper did not answer"))
    elif at == "load":
        recovery.payload.load = fail(SnapshotMismatch("injected: taken by another model"))
    elif at == "rebuild":
        recovery.codec.decode = wrong
    elif at == "disk":
        recovery._load_flushed = fail(FlushError("injected: the flushed file cannot be read"))
    else:
        raise ValueError(f"no such failure to inject: {at!r}")


def failed(out: Path, rank: int, world: int, error: Exception) -> None:
    """Writes this rank's restore error, then waits (at most 120 s) until every rank has written
    its outcome (its error or its Restored)."""
    (out / f"error_{rank}.json").write_text(json.dumps({"type": type(error).__name__, "message": str(error)}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
        (out / f"error_{r}.json").exists() or (out / f"restored_{r}.json").exists() for r in range(world)
    ):
        time.sleep(0.05)


def main(spec: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(spec["out"])
    model, opt = offload.wrap(Net(), device="cpu", dtype="float32", optimizer={"lr": 3e-3})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cfg = SnapshotConfig(
        dir=str(Path(spec["keepers"]) / "node{rank}"), flush_dir=spec["flush"], idle_timeout_s=120.0
    )
    fail = spec.get("fail")
    if fail is not None and fail["rank"] == rank:
        inject(fail["at"])
    try:
        snap = Snapshotter(model, opt, cfg, **spec.get("snapshot", {}))
    except Exception as e:
        if fail is not None:
            failed(out, rank, world, e)
        raise
    start = 0
    if spec["phase"] == "resume":
        try:
            restored = snap.restore(scheduler=sched)
        except Exception as e:
            if fail is not None:
                failed(out, rank, world, e)
            raise
        start = restored.step or 0
        record = {"source": restored.source, "step": restored.step, "message": restored.message}
        record |= {"extra": restored.extra, "seconds": restored.seconds}
        (out / f"restored_{rank}.json").write_text(json.dumps(record))
        if restored.extra:
            assert restored.extra["position"] == start, restored.extra
    losses = {}
    for step in range(start + 1, spec["steps"] + 1):
        x, y = batch(step, rank, world)
        loss = model(x, y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses[step] = float(total) / world
        if spec["phase"] == "reference" and step <= spec["snap_until"]:
            snap.snapshot(step, scheduler=sched, extra={"position": step})
    snap.wait()
    state = offload.state_dict(model)  # a collective
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "state.safetensors"))
        (out / "losses.json").write_text(json.dumps(losses))
    stats = snap.current.stats if snap.current is not None else None
    if stats is not None:
        (out / f"stats_{rank}.json").write_text(
            json.dumps({"payload": stats.payload, "segment": stats.segment})
        )
    dist.barrier()
    if rank == spec.get("victim"):
        os.kill(os.getpid(), signal.SIGKILL)  # a crashed trainer: its keeper keeps its snapshot
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
