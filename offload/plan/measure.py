"""Rates the recompute-or-offload choice needs, measured on this machine: the host link and compute.

On CUDA: pinned-host-to-device and device-to-pinned-host copies of ``nbytes``, and a square
matmul in the compute dtype, timed with CUDA events (best of a few runs, after a warm-up). On the
CPU the "link" is a memory copy and the compute a float32 matmul, timed with the host clock:
rough, but the same cost model then applies to a CPU run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Rates:
    h2d_bytes_s: float
    d2h_bytes_s: float
    flops: float
    """Dense matmul rate of the compute dtype, in floating-point operations per second."""


def measure_rates(device: torch.device, dtype: torch.dtype, nbytes: int = 64 << 20, reps: int = 3) -> Rates:
    """The link's rates both ways and the matmul rate on device (see the module docstring)."""
    h2d, d2h = measure_link(device, nbytes, reps)
    return Rates(h2d, d2h, measure_flops(device, dtype, reps))


def measure_link(device: torch.device, nbytes: int = 64 << 20, reps: int = 3) -> tuple[float, float]:
    """(host-to-device, device-to-host) bytes per second for copies of nbytes."""
    if device.type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        h2d = nbytes / _best(lambda: dev.copy_(host, non_blocking=True), device, reps)
        return h2d, nbytes / _best(lambda: host.copy_(dev, non_blocking=True), device, reps)
    a, b = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    rate = nbytes / _best(lambda: a.copy_(b), device, reps)
    return rate, rate


def measure_flops(device: torch.device, dtype: torch.dtype, reps: int = 3) -> float:
    """Floating-point operations per second of a square matmul in dtype (float32 on the CPU)."""
    n = 4096 if device.type == "cuda" else 512
    if device.type != "cuda":
        dtype = torch.float32
    x = torch.randn(n, n, device=device).to(dtype)
    y = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best(lambda: torch.mm(x, y), device, reps)


def _best(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds of the fastest of reps runs of fn (after one warm-up run)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return max(min(times), 1e-9)
