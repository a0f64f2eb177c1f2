"""Times the CPU optimizer step: torch's three passes against offload's fused kernel.

    python scripts/bench_adam.py --sizes 64 128 256 --repeats 5

torch: upcast the bf16 gradient to fp32, torch._fused_adamw_, downcast the master to the bf16 wire
copy (40 bytes of memory traffic per parameter). offload: offload.engine.cpu_adam.fused_adamw_ on
the bf16 gradient, writing the wire copy in the same pass (28 bytes per parameter); also timed on
an fp32 gradient without a wire copy, the same job as torch's fused kernel alone. All variants use
every core. Prints a table and writes JSON (default benchmarks/results/adam_<date>_<host>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without pip install -e .

from offload.engine.cpu_adam import fused_adamw_  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HP = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
# Bytes moved per parameter: reads then writes.
BYTES = {
    "torch upcast": 2 + 4,
    "torch fused (fp32 grad)": 16 + 12,
    "torch downcast": 4 + 2,
    "torch 3 passes": 40,
    "offload fused (fp32 grad)": 16 + 12,
    "offload fused (bf16 grad + wire)": 14 + 14,
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first touch, thread start-up, branch predictors
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(n: int, threads: int, repeats: int) -> dict[str, float]:
    master = torch.randn(n)
    exp_avg = torch.randn(n) * 1e-3
    exp_avg_sq = torch.rand(n) * 1e-6
    grad_bf16 = torch.randn(n).to(torch.bfloat16)
    grad_f32 = torch.empty(n)
    wire = torch.empty(n, dtype=torch.bfloat16)
    step = [0]

    def next_step() -> int:
        step[0] += 1
        return step[0]

    def torch_fused() -> None:
        torch._fused_adamw_(
            [master],
            [grad_f32],
            [exp_avg],
            [exp_avg_sq],
            [],
            [torch.tensor(float(next_step()))],
            lr=HP["lr"],
            beta1=HP["beta1"],
            beta2=HP["beta2"],
            weight_decay=HP["weight_decay"],
            eps=HP["eps"],
            amsgrad=False,
            maximize=False,
        )

    def ours(grad: torch.Tensor, out: torch.Tensor | None) -> Callable[[], None]:
        return lambda: fused_adamw_(
            master, exp_avg, exp_avg_sq, grad, step=next_step(), wire=out, threads=threads, **HP
        )

    secs = {
        "torch upcast": median_seconds(lambda: grad_f32.copy_(grad_bf16), repeats),
        "torch fused (fp32 grad)": median_seconds(torch_fused, repeats),
        "torch downcast": median_seconds(lambda: wire.copy_(master), repeats),
        "offload fused (fp32 grad)": median_seconds(ours(grad_f32, None), repeats),
        "offload fused (bf16 grad + wire)": median_seconds(ours(grad_bf16, wire), repeats),
    }
    secs["torch 3 passes"] = secs["torch upcast"] + secs["torch fused (fp32 grad)"] + secs["torch downcast"]
    return secs


@dataclass(slots=True)
class Row:
    params: int
    variant: str
    seconds: float
    gparams_per_s: float
    gbytes_per_s: float

    @classmethod
    def of(cls, n: int, variant: str, seconds: float) -> Row:
        return cls(n, variant, seconds, n / seconds / 1e9, n * BYTES[variant] / seconds / 1e9)


def render(rows: list[Row]) -> str:
    head = f"{'params':>8}  {'variant':<34} {'ms':>9} {'G params/s':>11} {'GB/s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.params // 2**20:>7}M  {r.variant:<34} {r.seconds * 1e3:>9.1f}"
            f" {r.gparams_per_s:>11.3f} {r.gbytes_per_s:>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 128, 256], help="parameters, in Mi (2**20)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant; the median is kept")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON file (default {RESULTS}/adam_<date>_<host>.json)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows: list[Row] = []
    for size in args.sizes:
        n = size * 2**20
        # Buffers: three fp32 states and an fp32 gradient, a bf16 gradient and wire copy.
        need = n * (4 * 4 + 2 * 2)
        if need > psutil.virtual_memory().available * 0.9:
            print(f"bench_adam: skipping {size}M params: needs {need / 2**30:.1f} GiB", file=sys.stderr)
            continue
        rows += [Row.of(n, v, secs) for v, secs in bench_size(n, args.threads, args.repeats).items()]
    now = dt.datetime.now(dt.timezone.utc)
    host = socket.gethostname()
    result = {
        "date": now.isoformat(timespec="seconds"),
        "host": {
            "name": host,
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "offload_adamw_isa": os.environ.get("OFFLOAD_ADAMW_ISA", "best"),
        },
        "threads": args.threads,
        "repeats": args.repeats,
        "hyperparameters": HP,
        "bytes_per_param": BYTES,
        "results": [asdict(r) for r in rows],
    }
    print(render(rows))
    slug = re.sub(r"[^a-z0-9.]+", "-", host.lower()).strip("-")
    path = args.out or RESULTS / f"adam_{now.date().isoformat()}_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
