"""Rates the recompute-or-keep choice needs, measured on this machine: the host link, compute,
the CPU optimizer and, for boundary states on nvme, the disk.

On CUDA: pinned-host-to-device and device-to-pinned-host copies of ``nbytes``, one way at a time
and both at once (on two streams: PCIe carries less than the sum), a square matmul and a causal
flash attention in the compute dtype, timed with CUDA events (best of a few runs, after a
warm-up); and the fused CPU AdamW over a block-sized buffer, timed with the host clock. On the
CPU the "link" is a memory copy and the compute a float32 matmul: rough, but the same cost model
then applies to a CPU run. The disk: one O_DIRECT write (to its fsync) and read of a scratch
file through ``offload.io``, as ``offload bench io`` measures a backend, with the engine the
boundary-state store uses.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class Rates:
    h2d_bytes_s: float
    d2h_bytes_s: float
    flops: float
    """Dense matmul rate of the compute dtype, in floating-point operations per second."""
    duplex_bytes_s: float | None = None
    """Both link directions at once; None: the sum of the two."""
    attention_flops: float | None = None
    """Causal attention forward (flash), counted as 2 batch seq^2 hidden; None: half of flops."""
    adam_params_s: float | None = None
    """Parameters per second the fused CPU AdamW updates; None: not counted (no CPU bound)."""
    disk_write_bytes_s: float | None = None
    """Bytes per second the disk under nvme_dirs writes (boundary states on nvme, in forward);
    None: not counted."""
    disk_read_bytes_s: float | None = None
    """... and reads back (in backward); None: not counted."""
    memory_bytes_s: float | None = None
    """Bytes per second the device's memory moves in a copy (read and write counted); the
    block's element-wise work runs at it. None: that work is not counted."""

    def __post_init__(self) -> None:
        for name in ("disk_write_bytes_s", "disk_read_bytes_s", "memory_bytes_s"):
            rate = getattr(self, name)
            if rate is not None and not rate > 0:
                raise ValueError(f"{name} must be > 0 bytes/s, got {rate}")

    @property
    def attention(self) -> float:
        return self.attention_flops if self.attention_flops is not None else self.flops / 2


def measure_rates(device: torch.device, dtype: torch.dtype, nbytes: int = 64 << 20, reps: int = 3) -> Rates:
    """The link's rates both ways, the matmul and attention rates on device, the CPU AdamW rate."""
    h2d, d2h = measure_link(device, nbytes, reps)
    return Rates(
        h2d,
        d2h,
        measure_flops(device, dtype, reps),
        duplex_bytes_s=measure_duplex(device, nbytes, reps),
        attention_flops=measure_attention(device, dtype, reps),
        adam_params_s=measure_adam(),
        memory_bytes_s=measure_memory(device, reps=reps),
    )


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


def measure_duplex(device: torch.device, nbytes: int = 64 << 20, reps: int = 3) -> float | None:
    """Bytes per second moved when both directions copy at once (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_in = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_out = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def both() -> None:
        current = torch.cuda.current_stream(device)
        for s in (up, down):
            s.wait_stream(current)  # both copies start after the timing event
        with torch.cuda.stream(up):
            dev_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(down):
            host_out.copy_(dev_out, non_blocking=True)
        for s in (up, down):
            current.wait_stream(s)  # the end event waits for both copies

    return 2 * nbytes / _best(both, device, reps)


def measure_memory(device: torch.device, nbytes: int = 512 << 20, reps: int = 3) -> float:
    """Bytes per second a copy of nbytes within the device's memory moves, reads and writes
    counted (on the CPU, within host memory)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best(lambda: dst.copy_(src), device, reps)


def measure_flops(device: torch.device, dtype: torch.dtype, reps: int = 3) -> float:
    """Floating-point operations per second of a square matmul in dtype (float32 on the CPU)."""
    n = 8192 if device.type == "cuda" else 512
    if device.type != "cuda":
        dtype = torch.float32
    x = torch.randn(n, n, device=device).to(dtype)
    y = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best(lambda: torch.mm(x, y), device, reps)


def measure_attention(device: torch.device, dtype: torch.dtype, reps: int = 3) -> float | None:
    """Causal scaled_dot_product_attention forward, in FLOPs per second as 2 batch seq^2 hidden
    (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    b, h, s, d = 1, 32, 8192, 128
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
    fn = torch.nn.functional.scaled_dot_product_attention
    return 2 * b * s * s * h * d / _best(lambda: fn(q, k, v, is_causal=True), device, reps)


def measure_adam(numel: int = 32 << 20, reps: int = 3) -> float:
    """Parameters per second of the fused CPU AdamW (bf16 gradient and wire copy), with the
    threads the runtime's optimizer uses (all cores but two)."""
    from offload.engine.cpu_adam import fused_adamw_

    master, m, v = (torch.zeros(numel) for _ in range(3))
    grad, wire = torch.zeros(numel, dtype=torch.bfloat16), torch.empty(numel, dtype=torch.bfloat16)
    threads = max(1, (os.cpu_count() or 2) - 2)
    step = [0]

    def update() -> None:
        step[0] += 1
        fused_adamw_(
            master, m, v, grad, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
            step=step[0], wire=wire, threads=threads,
        )  # fmt: skip

    return numel / _best(update, torch.device("cpu"), reps)


DISK_PROBE_BYTES = 256 << 20
"""Bytes measure_disk moves each way by default: enough to keep an NVMe drive's queue full for a
while, little enough that ``offload plan`` stays quick."""


def measure_disk(directory: str | os.PathLike[str], nbytes: int = DISK_PROBE_BYTES) -> tuple[float, float]:
    """(write, read) bytes per second of one O_DIRECT transfer of nbytes (a multiple of 4096) to
    and from a scratch file in directory, removed afterwards. The write is timed to its fsync;
    the read comes from the disk (O_DIRECT bypasses the page cache).

    Raises OSError, saying why, when directory cannot take it (missing, no O_DIRECT, too full)."""
    from offload import io as oio
    from offload.memory import PinnedPool

    if nbytes <= 0 or nbytes % 4096:
        raise ValueError(f"nbytes must be a positive multiple of 4096 (O_DIRECT), got {nbytes}")
    check = oio.check_direct(directory)
    if not check.ok:
        raise OSError(check.reason)
    free = shutil.disk_usage(directory).free
    if free < 2 * nbytes:
        raise OSError(f"{directory} has {free} bytes free, the probe needs {2 * nbytes}")
    path = Path(directory) / f".offload-disk-probe-{os.getpid()}.bin"
    with PinnedPool(nbytes, arena_bytes=nbytes, pin=False, name="disk-probe") as pool, oio.Engine() as engine:
        pool.attach_io(engine)  # registered buffers where io_uring takes them, as the store's are
        try:
            with pool.lease(nbytes, purpose="disk-probe") as buf:
                _fill_random(buf.tensor)
                with oio.open(path, "w", engine=engine) as f:
                    t = time.perf_counter()
                    f.write_from(buf).wait()
                    f.sync()
                    write_s = time.perf_counter() - t
                    t = time.perf_counter()
                    f.read_into(buf).wait()
                    read_s = time.perf_counter() - t
        finally:
            path.unlink(missing_ok=True)
            pool.detach_io(engine)  # before the engine closes, as the pool requires
    return nbytes / max(write_s, 1e-9), nbytes / max(read_s, 1e-9)


def _fill_random(t: torch.Tensor) -> None:
    """Random bytes, 1 MiB repeated: a drive that compresses or deduplicates sees no pattern."""
    block = torch.frombuffer(bytearray(os.urandom(1 << 20)), dtype=torch.uint8)
    for start in range(0, t.numel(), block.numel()):
        part = t[start : start + block.numel()]
        part.copy_(block[: part.numel()])


WARMUP_S = 0.1
"""Seconds a CUDA probe runs before it is timed: an idle GPU's clocks take a while to rise, and
a probe timed at once measured a 4096-cube matmul at 580 TFLOPS where the same process measured
803 a moment later (H100, 2026-11-24)."""


def _best(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds of the fastest of reps runs of fn, after one warm-up run (on CUDA, runs for
    WARMUP_S: the clocks rise)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        until = time.perf_counter() + WARMUP_S
        while time.perf_counter() < until:
            fn()
            torch.cuda.synchronize(device)
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
