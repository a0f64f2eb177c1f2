"""What does mapping and pinning a staging lease cost, and what makes it slow?

At 128K tokens auto grew the NVMe staging leases from 4 to 14 (10.6 GiB) and mapping them took
75.7 s. This maps arenas of --arena-gib one at a time, as offload's pools do (offload._C.Arena:
mmap, madvise for transparent huge pages, every page touched; then cudaHostRegister; then
io_uring's buffer registration), and times each part, with and without huge pages:

- fresh: the process as started;
- anon: after holding anonymous memory until --left-gib is available, every other chunk of it
  freed again (physical memory fragmented, as a long-running trainer's is);
- cache: also after a buffered write of --cache-gib to --dir (the page cache full: free memory
  low, available memory high);
- registered: also with --registered-gib already registered with the same io_uring ring (the
  staging pool's first leases, before it grows).

The kernel's counters of compaction, reclaim and huge-page faults are read around each part.
Prints a table and writes JSON (--out):

    python scripts/probe_pinning.py --out $OUT/pinning.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from offload.io import Engine
from offload.memory import cuda
from offload.memory.arena import HostArena

GIB = 1 << 30
COUNTERS = (
    "compact_stall",
    "compact_fail",
    "compact_success",
    "thp_fault_alloc",
    "thp_fault_fallback",
    "pgscan_direct",
    "pgsteal_direct",
    "allocstall_normal",
    "allocstall_movable",
    "pgmigrate_success",
    "pgmigrate_fail",
    "thp_migration_success",
    "thp_split_page",
)


def vmstat() -> dict[str, int]:
    """The kernel's memory counters ({} where there is no /proc/vmstat)."""
    out: dict[str, int] = {}
    path = Path("/proc/vmstat")
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        name, value = line.split()
        out[name] = int(value)
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS if after.get(k, 0) != before.get(k, 0)}


def map_arenas(count: int, nbytes: int, hugepages: bool, engine: Engine | None) -> dict[str, Any]:
    """Maps, pins and registers count arenas; the seconds of each part summed, then frees them."""
    parts = {"map_s": 0.0, "pin_s": 0.0, "register_s": 0.0}
    before = vmstat()
    arenas = []
    for _ in range(count):
        t0 = time.perf_counter()
        arena = HostArena(nbytes, node=None, hugepages=hugepages, pin=False)
        t1 = time.perf_counter()
        if cuda.cuda_available():
            cuda.host_register(arena.ptr, arena.size)
        t2 = time.perf_counter()
        if engine is not None:
            engine.register(arena.ptr, arena.size)
        t3 = time.perf_counter()
        parts["map_s"] += t1 - t0
        parts["pin_s"] += t2 - t1
        parts["register_s"] += t3 - t2
        arenas.append(arena)
    counters = delta(before, vmstat())
    if cuda.cuda_available():
        parts.update(copy_rates(arenas[0]))
    for arena in arenas:
        if engine is not None:
            engine.unregister(arena.ptr)
        if cuda.cuda_available():
            cuda.host_unregister(arena.ptr)
        arena.close()
    return {"arenas": count, "hugepages": hugepages, **parts, "counters": counters}


def copy_rates(arena: HostArena, repeat: int = 3) -> dict[str, float]:
    """GB/s of copies between the (pinned) arena and the device, each way, the best of repeat."""
    import torch

    host = arena.tensor(0, arena.size)
    dev = torch.empty(arena.size, dtype=torch.uint8, device="cuda")
    rates = {}
    for name, dst, src in (("h2d_GBs", dev, host), ("d2h_GBs", host, dev)):
        best = float("inf")
        for _ in range(repeat):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        rates[name] = arena.size / best / 1e9
    return rates


def hold_anonymous(left: int, chunk: int = 64 << 20) -> list[np.ndarray]:
    """Touches chunks until about left bytes are available, frees every other one, and fills the
    holes again with chunks of a sixteenth the size."""
    held = _touch(left, chunk)[::2]
    return held + _touch(left, chunk // 16)


def _touch(left: int, chunk: int) -> list[np.ndarray]:
    held: list[np.ndarray] = []
    while psutil.virtual_memory().available > left + chunk:
        a = np.empty(chunk, dtype=np.uint8)
        a[::4096] = 1
        held.append(a)
    return held


def fill_cache(directory: Path, nbytes: int) -> Path:
    path = directory / "probe_pinning.fill"
    block = np.ones(64 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        for _ in range(nbytes // block.nbytes):
            f.write(block.data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arena-gib", type=float, default=1.0)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--left-gib", type=float, default=40.0, help="available memory the anon phase leaves")
    ap.add_argument("--cache-gib", type=float, default=30.0)
    ap.add_argument("--registered-gib", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    nbytes = int(args.arena_gib * GIB)
    if cuda.cuda_available():
        import torch

        torch.cuda.init()  # not inside the first arena's figures
    engine = Engine()
    if engine.backend != "io_uring":
        engine = None
    thp = {
        name: Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
        for name in ("enabled", "defrag")
    }
    rows: list[dict[str, Any]] = []

    def measure(phase: str) -> None:
        mem = psutil.virtual_memory()
        for hugepages in (True, False):
            row = {"phase": phase, "available_GiB": mem.available / GIB, "free_GiB": mem.free / GIB}
            row.update(map_arenas(args.count, nbytes, hugepages, engine))
            rows.append(row)
            print(
                f"{phase:6} hugepages={hugepages!s:5} avail {row['available_GiB']:6.1f} GiB free "
                f"{row['free_GiB']:6.1f} GiB: map {row['map_s']:7.2f} s pin {row['pin_s']:6.2f} s "
                f"register {row['register_s']:6.2f} s  copies {row.get('h2d_GBs', 0):5.1f} / "
                f"{row.get('d2h_GBs', 0):5.1f} GB/s  {row['counters']}",
                flush=True,
            )

    measure("fresh")
    held = hold_anonymous(int(args.left_gib * GIB))
    measure("anon")
    fill = fill_cache(args.dir, int(args.cache_gib * GIB))
    try:
        measure("cache")
        first = (
            []
            if engine is None
            else [HostArena(GIB, node=None, hugepages=True, pin=False) for _ in range(args.registered_gib)]
        )
        for arena in first:
            engine.register(arena.ptr, arena.size)
        measure("registered")
        for arena in first:
            engine.unregister(arena.ptr)
            arena.close()
    finally:
        fill.unlink()
    del held
    result = {
        "date": date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "memory_GiB": psutil.virtual_memory().total / GIB,
        "kernel": platform.release(),
        "zones": sorted(
            {
                line.split()[3]
                for line in Path("/proc/zoneinfo").read_text().splitlines()
                if line.startswith("Node")
            }
        ),
        "thp": thp,
        "arena_GiB": args.arena_gib,
        "io_backend": "io_uring" if engine is not None else "threads (no registration)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
