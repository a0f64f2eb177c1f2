"""One rank of a multi-rank test run (tests/test_dist.py launches it with torchrun).

Trains a tiny model through offload.wrap on this rank's share of each global batch, then rank 0
writes the per-step global losses (JSON) and the final weights (safetensors)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import offload
from offload.config import Tier, load_config
from offload.plan import make_plan
from tests.models import run_steps, tiny
from tests.test_dist import global_batch


def main(spec: dict) -> None:
    device = spec.get("device", "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = tiny(spec["family"], layers=spec.get("layers", 3))
        wrapped, opt = offload.wrap(model, device=device, dtype="float32", **spec["wrap"])
        per_rank = spec["batch"] // world

        def mine(step: int, micro: int) -> torch.Tensor:
            return global_batch(spec, step, micro)[rank * per_rank : (rank + 1) * per_rank]

        def mean_over_ranks(loss: float) -> float:
            total = torch.tensor([loss], device=wrapped.runtime.device.torch)
            dist.all_reduce(total)
            return float(total) / world

        accum, start = spec.get("accum", 1), spec.get("start", 0)
        if "load" in spec:  # a checkpoint saved at step `start`, by any number of ranks
            offload.load(wrapped, opt, spec["load"])
        save_at = spec.get("save_at", spec["steps"])

        def shifted(begin: int) -> Any:
            return lambda step, micro: mine(begin + step, micro)

        losses = run_steps(wrapped, opt, save_at - start, accum, shifted(start), mean_over_ranks)
        if "save_at" in spec:  # every rank calls save(); rank 0 writes
            try:
                offload.save(wrapped, opt, spec.get("save_root", spec["out"] + "/ckpt"), step=save_at).wait()
            except Exception as e:  # the failure test: every rank must get an error, none may hang
                Path(spec["out"], f"save_error.{rank}").write_text(f"{type(e).__name__}: {e}")
        losses += run_steps(wrapped, opt, spec["steps"] - save_at, accum, shifted(save_at), mean_over_ranks)
        rt = wrapped.runtime
        streamed = [r for r in rt.blocks if not r.on_device]
        dev = wrapped.runtime.device.torch
        cfg = load_config(None, device=device, dtype="float32", **spec["wrap"])
        plan = make_plan(
            tiny(spec["family"], layers=spec.get("layers", 3)),
            cfg,
            batch_size=1,
            seq_len=1,
            world_size=world,
            grad_accum=spec.get("accum", 1),
        )
        counts = [
            sum(r.numel for r in streamed),
            sum(r.layout.numel for r in streamed),
            sum(r.state_bytes() for r in rt.records() if not r.on_device),
            plan.store_bytes(Tier.HOST) + plan.get("grad_accum", Tier.HOST),
            rt.pool.config.capacity,
            plan.pinned_bytes,
        ]
        held = [torch.zeros(len(counts), dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(held, torch.tensor(counts, device=dev))
        state = offload.state_dict(wrapped)  # a collective: every rank takes part
        if rank == 0:
            out = Path(spec["out"])
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / "state.safetensors"))
            (out / "losses.json").write_text(json.dumps(losses))
            (out / "held.json").write_text(json.dumps([h.tolist() for h in held]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
