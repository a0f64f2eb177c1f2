"""What in-memory snapshots cost a training run, and how fast a restart gets its state back.

    python scripts/bench_snapshot.py --size tiny --steps 4 --out bench_snapshot.json
    torchrun --nproc-per-node=3 scripts/bench_snapshot.py --size tiny --keeper-per-rank  # parity

Trains the Llama shape of scripts/bench_train.py (bf16 with ``device_blocks`` 12 on CUDA, float32
on the CPU, ``overlap_backward`` on) and measures, per rank:

1. N steps without snapshots, N with a lazy snapshot after every step, N with a synchronous one
   (after two untimed snapshots: the first writes into each buffer fault its pages in):
   the mean step time, the overhead against the plain steps, and each snapshot's stall (the call
   plus the optimizer's holds), capture time (to this rank's data committed) and parity time;
2. the snapshot's payload and segment bytes (segment / payload is (k + m) / k, plus the header);
3. ``Snapshotter.restore`` from the keeper into the same run (what a restarted trainer does after
   its wrap), and ``flush`` of one snapshot to disk.

Under torchrun, ``--keeper-per-rank`` gives each rank a keeper of its own, so one host exercises
the parity exchange as several nodes would (m = 1, k = ranks - 1). Prints a table (rank 0; every
figure is the maximum over ranks) and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import llama_config, train_step  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="a shape of scripts/bench_train.py (default tiny)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per phase (default 4)")
    p.add_argument(
        "--every",
        type=int,
        default=0,
        help="also: lazy snapshots every this many steps, --steps of them (0: skip; the spaced "
        "schedule every: auto would pick when a snapshot costs more than 3%% of a step)",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    p.add_argument("--keeper-per-rank", action="store_true", help="a keeper per rank: parity on one host")
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (keepers, flushed snapshot)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    cuda = torch.cuda.is_available() and not a.cpu
    from offload.train.ranks import join

    ranks = join("cuda" if cuda else "cpu")
    rank, world = ranks.rank, ranks.world
    scratch = Path(a.dir or tempfile.mkdtemp(prefix="osnap-bench-", dir="/tmp"))
    model, opt, nparams = wrap(a, cuda)
    x = torch.randint(0, 32000, (a.batch, a.seq), device="cuda" if cuda else "cpu")
    step(model, opt, x, cuda)  # warm-up
    plain = [step(model, opt, x, cuda) for _ in range(a.steps)]
    snap = snapshotter(model, opt, a, scratch, rank, world)
    try:
        mine = measure(snap, model, opt, x, cuda, a.steps, scratch, a.every)
        mine["plain_s"] = statistics.mean(plain)
        everyone = gather(mine, world)
    finally:
        # A keeper per rank, or one per host: stopped once every rank is done with it.
        if a.keeper_per_rank or int(os.environ.get("LOCAL_RANK", "0")) == 0:
            snap.client.stop()
        snap.close()
    if rank == 0:
        report = summarize(a, cuda, world, nparams, snap.topo.k, snap.topo.m, everyone)
        print(render(report))
        if a.out is not None:
            a.out.write_text(json.dumps(report, indent=1))
    if a.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def wrap(a: argparse.Namespace, cuda: bool) -> tuple[Any, Any, int]:
    import torch
    from transformers import LlamaForCausalLM

    import offload

    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config(a.size, a.seq))
    nparams = sum(p.numel() for p in meta.parameters())
    model, opt = offload.wrap(
        meta,
        init="random",
        device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32",
        placement={"device_blocks": 12 if cuda else 0},
        optimizer={"lr": 1e-5, "overlap_backward": True},
    )
    return model, opt, nparams


def snapshotter(model: Any, opt: Any, a: argparse.Namespace, scratch: Path, rank: int, world: int) -> Any:
    from offload.snapshot.config import SnapshotConfig
    from offload.snapshot.snapshotter import Snapshotter

    where = scratch / ("node{rank}" if a.keeper_per_rank else "keeper")
    return Snapshotter(model, opt, SnapshotConfig(dir=str(where), job="bench", idle_timeout_s=600.0))


def step(model: Any, opt: Any, x: Any, cuda: bool, after: Any = None) -> float:
    """One step's wall time (bench_train's timed step); after: called at the step boundary."""
    return train_step(model, opt, x, cuda, after)[0]


def run(
    snap: Any, model: Any, opt: Any, x: Any, cuda: bool, steps: int, lazy: bool, every: int = 1
) -> dict[str, Any]:
    """steps steps, a snapshot after every ``every`` of them (inside the step's time); then the
    last one waited for."""
    snap.cfg.lazy = lazy
    handles: list[Any] = []
    times = [
        step(model, opt, x, cuda, lambda: handles.append(snap.snapshot(len(handles) + 1)))
        if (i + 1) % every == 0
        else step(model, opt, x, cuda)
        for i in range(steps)
    ]
    snap.wait()
    return {"steps": times, "stats": [h.stats for h in handles]}


def measure(
    snap: Any, model: Any, opt: Any, x: Any, cuda: bool, steps: int, scratch: Path, every: int
) -> dict[str, Any]:
    run(snap, model, opt, x, cuda, 2, lazy=False)  # untimed: both buffers' pages faulted in
    lazy = run(snap, model, opt, x, cuda, steps, lazy=True)
    sync = run(snap, model, opt, x, cuda, steps, lazy=False)
    spaced = {}
    if every > 0:
        r = run(snap, model, opt, x, cuda, steps * every, lazy=True, every=every)
        spaced = {
            "spaced_every": every,
            "spaced_step_s": statistics.mean(r["steps"]),
            "spaced_stall_s": statistics.mean(s.stall_s for s in r["stats"]),
            "spaced_capture_s": statistics.mean(s.capture_s for s in r["stats"]),
        }
    for name, r in (("lazy", lazy), ("sync", sync)):  # figures so far, in case a later phase fails
        print(f"{name}: steps {r['steps']}, stall {[s.stall_s for s in r['stats']]}", flush=True)
    t = time.perf_counter()
    restored = snap.restore()
    restore_s = time.perf_counter() - t
    print(f"restore {restore_s:.2f} s from {restored.source}; spaced {spaced}", flush=True)
    t = time.perf_counter()
    flushed = snap.flush(scratch / "flushed")
    flush_s = time.perf_counter() - t
    return {
        "lazy_step_s": statistics.mean(lazy["steps"]),
        "sync_step_s": statistics.mean(sync["steps"]),
        "lazy_stall_s": statistics.mean(s.stall_s for s in lazy["stats"]),
        "lazy_capture_s": statistics.mean(s.capture_s for s in lazy["stats"]),
        "sync_capture_s": statistics.mean(s.capture_s for s in sync["stats"]),
        "parity_s": statistics.mean(s.parity_s for s in lazy["stats"] + sync["stats"]),
        "payload": lazy["stats"][-1].payload,
        "segment": lazy["stats"][-1].segment,
        "restore_s": restore_s,
        "restored_from": restored.source,
        "flush_s": flush_s,
        "flushed_bytes": flushed.stat().st_size,
        **spaced,
    }


def gather(mine: dict[str, Any], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return [mine]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def summarize(
    a: argparse.Namespace, cuda: bool, world: int, nparams: int, k: int, m: int, ranks: list[dict[str, Any]]
) -> dict[str, Any]:
    from offload.snapshot.config import interval

    worst = {key: max(r[key] for r in ranks) for key, v in ranks[0].items() if isinstance(v, (int, float))}
    return {
        "date": date.today().isoformat(),
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "device": "cuda" if cuda else "cpu",
        "size": a.size,
        "params": nparams,
        "batch": a.batch,
        "seq": a.seq,
        "world": world,
        "k": k,
        "m": m,
        "steps": a.steps,
        "lazy_overhead_pct": 100 * (worst["lazy_step_s"] / worst["plain_s"] - 1),
        "sync_overhead_pct": 100 * (worst["sync_step_s"] / worst["plain_s"] - 1),
        "segment_over_payload": worst["segment"] / worst["payload"],
        **(
            {
                "spaced_overhead_pct": 100 * (worst["spaced_step_s"] / worst["plain_s"] - 1),
                "spaced_stall_pct_of_step": 100 * worst["spaced_stall_s"] / worst["plain_s"],
                "auto_every": interval(worst["lazy_stall_s"], worst["plain_s"], 0.03),
            }
            if "spaced_step_s" in worst
            else {}
        ),
        "max_over_ranks": worst,
        "ranks": ranks,
    }


def render(r: dict[str, Any]) -> str:
    w = r["max_over_ranks"]
    rows = [
        (
            "model",
            f"{r['size']}: {r['params'] / 1e6:.1f}M params, {r['device']}, {r['world']} rank(s), k={r['k']} m={r['m']}",
        ),
        ("step, no snapshots", f"{w['plain_s'] * 1e3:.1f} ms"),
        (
            "step, lazy snapshot each",
            f"{w['lazy_step_s'] * 1e3:.1f} ms ({r['lazy_overhead_pct']:+.1f}%), stall {w['lazy_stall_s'] * 1e3:.1f} ms",
        ),
        ("step, sync snapshot each", f"{w['sync_step_s'] * 1e3:.1f} ms ({r['sync_overhead_pct']:+.1f}%)"),
        *(
            [
                (
                    f"step, lazy every {w['spaced_every']}",
                    f"{w['spaced_step_s'] * 1e3:.1f} ms ({r['spaced_overhead_pct']:+.1f}%), stall per snapshot "
                    f"{w['spaced_stall_s'] * 1e3:.1f} ms, capture {w['spaced_capture_s'] * 1e3:.1f} ms; "
                    f"every: auto would take {r['auto_every']}",
                )
            ]
            if "spaced_step_s" in w
            else []
        ),
        ("capture (lazy, sync)", f"{w['lazy_capture_s'] * 1e3:.1f} ms, {w['sync_capture_s'] * 1e3:.1f} ms"),
        ("parity exchange", f"{w['parity_s'] * 1e3:.1f} ms"),
        (
            "payload, segment",
            f"{w['payload'] / 1e6:.1f} MB, {w['segment'] / 1e6:.1f} MB ({r['segment_over_payload']:.2f}x)",
        ),
        ("restore from keeper", f"{w['restore_s'] * 1e3:.1f} ms"),
        ("flush to disk", f"{w['flush_s'] * 1e3:.1f} ms, {w['flushed_bytes'] / 1e6:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


if __name__ == "__main__":
    sys.exit(main())
