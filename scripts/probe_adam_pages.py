"""Does the CPU optimizer run faster on huge pages?

The streamed blocks' fp32 master and Adam m and v are ordinary torch tensors, which the kernel
backs with 4 KiB pages where transparent huge pages are "madvise" (it asks nothing for them);
the update streams through all three every step, and on a virtual machine every TLB miss walks
two page tables. This times offload's fused AdamW (bf16 gradient in, bf16 wire copy out) on one
6.7B block's worth of parameters, with master, m and v (and the gradient and wire copy) from:

    base     torch.empty, as the runtime allocates them
    huge     torch.empty, then madvise(MADV_HUGEPAGE) over it before the first touch

Prints the median seconds and parameters per second of each, and writes JSON (--out):

    python scripts/probe_adam_pages.py --out $OUT/adam_pages.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offload.engine.cpu_adam import fused_adamw_

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def tensor(n: int, dtype: torch.dtype, huge: bool) -> torch.Tensor:
    """n elements, huge pages asked for over the 2 MiB-aligned part before any page is touched."""
    t = torch.empty(n + HUGE // dtype.itemsize, dtype=dtype)
    if huge:
        start = -(-t.data_ptr() // HUGE) * HUGE
        end = (t.data_ptr() + t.nbytes) // HUGE * HUGE
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE)")
    return t[:n]


def run(n: int, huge: bool, repeats: int) -> dict[str, float]:
    master, m, v = (tensor(n, torch.float32, huge) for _ in range(3))
    grad, wire = tensor(n, torch.bfloat16, huge), tensor(n, torch.bfloat16, huge)
    master.normal_()
    m.zero_()
    v.zero_()
    grad.normal_()
    times = []
    for step in range(1, repeats + 2):
        t = time.perf_counter()
        fused_adamw_(
            master,
            m,
            v,
            grad,
            lr=1e-4,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            step=step,
            wire=wire,
        )
        if step > 1:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return {"huge": huge, "seconds": s, "params_per_s": n / s, "anon_huge_GiB": anon_huge_gib()}


def anon_huge_gib() -> float:
    """The process's memory in transparent huge pages now, GiB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=202_383_360, help="one 6.7B Llama block")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3, help="base and huge alternate this many times")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):
        for huge in (False, True):
            r = run(args.params, huge, args.repeats)
            rows.append(r)
            print(
                f"{'huge' if huge else 'base'}  {r['seconds'] * 1e3:7.1f} ms  {r['params_per_s'] / 1e9:5.2f} G params/s"
                f"  ({r['anon_huge_GiB']:.2f} GiB of the process in huge pages)",
                flush=True,
            )
    result = {
        "date": date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
