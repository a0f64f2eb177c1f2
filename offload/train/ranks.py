"""The trainer's side of a torchrun launch: joins the process group torchrun describes (NCCL for
a CUDA run, gloo on the CPU), says which rank is the one that reports and writes, and averages a
number over the ranks. Without torchrun's environment (WORLD_SIZE unset or 1) it is one rank and
touches nothing."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Ranks:
    rank: int = 0
    world: int = 1
    owned: bool = False
    """This object initialised the process group, so leave() destroys it."""

    @property
    def main(self) -> bool:
        """The rank that logs and writes files."""
        return self.rank == 0

    def mean(self, value: float, device: torch.device) -> float:
        """value averaged over the ranks (a collective: every rank calls it)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor(
            [value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
        )
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def leave(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def join(device: str) -> Ranks:
    """The ranks of this launch; the default process group is initialised from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless the caller did it already."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), owned=True)


def torchrun(nproc: int) -> list[str]:
    """The command that starts what follows it on nproc ranks of this machine (torchrun
    --standalone, run by this interpreter): `offload train --nproc` and the multi-rank tests."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
