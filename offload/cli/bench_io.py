"""``offload bench io``: disk bandwidth through offload.io against the plain O_DIRECT baseline.

For each io backend, SIZE random bytes are written from a pool lease to a file (fsync included in
the write time) and read back into a second lease, which is then compared byte for byte (not
timed). The baseline is measured in the same run exactly as the hardware probe does it: 8 threads
each moving 8 MiB blocks with O_DIRECT pwritev/preadv from mmap buffers, fsync in the write time.
With CUDA, host-to-device copies from a pool lease are timed against a torch pinned tensor. Each
disk figure is the median of --repeat runs; GB/s are decimal (1e9 bytes per second).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from offload.cli import CliError
from offload.cli._table import format_table
from offload.utils.sizes import format_bytes, parse_bytes

ALIGN = 4096
BACKENDS = ("auto", "io_uring", "threads")
BASELINE_THREADS = 8
BASELINE_BLOCK = 8 << 20
FILL_CHUNK = 64 << 20
H2D_MAX = 1 << 30
H2D_REPS = 10
DISK_HEADROOM = 64 << 20


@dataclass(kw_only=True, slots=True)
class BenchIoConfig:
    """What ``offload bench io`` measures."""

    dir: Path
    """Directory the bench files go to (removed afterwards)."""
    size: int
    """Bytes written and read per measurement: a positive multiple of 4096 (O_DIRECT)."""
    backends: tuple[str, ...] = ("io_uring", "threads")
    """io backends to measure; "auto" measures what the engine picks (OFFLOAD_IO_BACKEND applies)."""
    queue_depth: int = 64
    """Requests in flight per engine."""
    chunk_bytes: int = 1 << 20
    """Size the engine splits a request into: a positive multiple of 4096."""
    repeat: int = 2
    """Measurements per figure; the report gives the median and every sample."""

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % ALIGN:
            raise ValueError(f"size must be a positive multiple of {ALIGN} bytes (O_DIRECT), got {self.size}")
        if self.chunk_bytes <= 0 or self.chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {self.chunk_bytes}")
        if self.queue_depth < 1:
            raise ValueError(f"queue_depth must be at least 1, got {self.queue_depth}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be at least 1, got {self.repeat}")
        if not self.backends or len(set(self.backends)) != len(self.backends):
            raise ValueError(
                f"backends must be a non-empty list without repeats, got {','.join(self.backends)!r}"
            )
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ValueError(f"backends must be among {', '.join(BACKENDS)}, got {', '.join(bad)}")


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "io",
        help="disk bandwidth through offload.io vs plain O_DIRECT",
        description="Write and read SIZE bytes through each io backend and through an 8-thread O_DIRECT baseline.",
    )
    add_arguments(p)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': stdout)")
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The measurement options (shared with scripts/bench_io.py)."""
    p.add_argument(
        "--dir", required=True, help="directory for the bench files (a disk that supports O_DIRECT)"
    )
    p.add_argument(
        "--size", required=True, type=_size_arg, help="bytes per measurement: 512MiB, 4GiB, 1G, ..."
    )
    p.add_argument("--backends", default="io_uring,threads", help="comma-separated: io_uring, threads, auto")
    p.add_argument("--queue-depth", type=int, default=64, help="requests in flight per engine (default 64)")
    p.add_argument(
        "--chunk", type=_size_arg, default=1 << 20, help="engine request chunk size (default 1MiB)"
    )
    p.add_argument(
        "--repeat", type=int, default=2, help="measurements per figure; median reported (default 2)"
    )


def _size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> BenchIoConfig:
    try:
        return BenchIoConfig(
            dir=Path(os.path.abspath(args.dir)),
            size=args.size,
            backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
            queue_depth=args.queue_depth,
            chunk_bytes=args.chunk,
            repeat=args.repeat,
        )
    except ValueError as e:
        raise CliError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run_bench(cfg)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(render(result), file=table_out)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        write_json(result, Path(args.json))
        print(f"results written to {args.json}", file=table_out)
    return report_failures(result)


def report_failures(result: dict[str, Any]) -> int:
    """Exit status: 1 when any backend read back different bytes than it wrote."""
    bad = [name for name, r in result["backends"].items() if not r["verified"]]
    if bad:
        print(f"offload: error: read-back verification failed for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def preflight(cfg: BenchIoConfig) -> None:
    """Refuses, with the reason, a directory or size the bench cannot use."""
    import psutil

    import offload.io as oio

    d = cfg.dir
    if not d.is_dir():
        raise CliError(f"--dir {d} does not exist" if not d.exists() else f"--dir {d} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".offload-bench-"):
            pass
    except OSError as e:
        raise CliError(f"--dir {d} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(d).free
    if free < cfg.size + DISK_HEADROOM:
        raise CliError(
            f"not enough free disk space in {d}: the bench needs {format_bytes(cfg.size)} "
            f"plus {format_bytes(DISK_HEADROOM)} headroom, {format_bytes(free)} is free"
        )
    direct = oio.check_direct(d)
    if not direct.ok:
        raise CliError(f"{direct.reason}; bench io measures O_DIRECT, pick a directory on a disk")
    available = psutil.virtual_memory().available
    if available < 2 * cfg.size + DISK_HEADROOM:
        raise CliError(
            f"not enough host memory: the bench holds two {format_bytes(cfg.size)} buffers, "
            f"{format_bytes(available)} is available"
        )


def run_bench(cfg: BenchIoConfig) -> dict[str, Any]:
    """Measures everything and returns the JSON-ready result (see docs/cli.md).

    Repeats are interleaved (baseline, then each backend, then again) so that a disk whose speed
    drifts during the run biases no contender.
    """
    import torch

    from offload.memory import PinnedPool

    preflight(cfg)
    dropped: list[bool] = []
    with ExitStack() as stack:
        # One arena per lease (arena_bytes=size): two leases always fit in exactly twice the size.
        pool = PinnedPool(2 * cfg.size, arena_bytes=cfg.size, name="bench-io")
        stack.callback(pool.close)
        src = stack.enter_context(pool.lease(cfg.size, purpose="bench-src"))
        dst = stack.enter_context(pool.lease(cfg.size, purpose="bench-dst"))
        _fill_random(src.tensor)
        engines = _open_engines(cfg, pool, stack)
        baseline = _Baseline(cfg, stack)
        samples = {name: _Samples() for name in engines}
        paths = {name: _scratch(_bench_path(cfg, name), stack) for name in engines}
        for _ in range(cfg.repeat):
            baseline.sample(dropped)
            for name, engine in engines.items():
                _backend_sample(engine, paths[name], src, dst, samples[name], dropped)
        h2d = _measure_h2d(src.tensor[: min(cfg.size, H2D_MAX)]) if torch.cuda.is_available() else None
    base = baseline.samples.figures()
    backends = {name: {**s.figures(), "verified": s.verified} for name, s in samples.items()}
    result: dict[str, Any] = {
        "size": cfg.size,
        "dir": str(cfg.dir),
        "queue_depth": cfg.queue_depth,
        "chunk_bytes": cfg.chunk_bytes,
        "backends": backends,
        "baseline": base,
        "ratios": {
            name: {"write": r["write_GBps"] / base["write_GBps"], "read": r["read_GBps"] / base["read_GBps"]}
            for name, r in backends.items()
        },
        "host": host_info(cfg, page_cache_dropped=bool(dropped) and all(dropped)),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if h2d is not None:
        result["h2d"] = h2d
    return result


@dataclass(slots=True)
class _Samples:
    """GB/s of every write and read of one contender, and whether every read-back matched."""

    write: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)
    verified: bool = True

    def figures(self) -> dict[str, Any]:
        return {
            "write_GBps": statistics.median(self.write),
            "read_GBps": statistics.median(self.read),
            "samples": {"write_GBps": self.write, "read_GBps": self.read},
        }


def _open_engines(cfg: BenchIoConfig, pool: Any, stack: ExitStack) -> dict[str, Any]:
    """One engine per requested backend, keyed by the backend it really is ("auto" resolves)."""
    import offload.io as oio

    engines: dict[str, Any] = {}
    for name in cfg.backends:
        try:
            engine = oio.Engine(backend=name, queue_depth=cfg.queue_depth, chunk_bytes=cfg.chunk_bytes)
        except OSError as e:
            print(f"offload bench io: skipping {name}: {e}", file=sys.stderr)
            continue
        stack.enter_context(engine)
        if engine.backend in engines:
            continue
        pool.attach_io(engine)  # registered buffers, as the runtime uses them
        stack.callback(pool.detach_io, engine)  # runs before the engine closes, as the pool requires
        engines[engine.backend] = engine
    if not engines:
        raise CliError("no io backend could be measured (see the messages above)")
    return engines


def _fill_random(t: Any) -> None:
    """Random bytes (incompressible, and a real check for the read-back), before any timing."""
    import numpy as np

    rng = np.random.default_rng()
    view = t.numpy()
    for start in range(0, view.size, FILL_CHUNK):
        end = min(start + FILL_CHUNK, view.size)
        view[start:end] = np.frombuffer(rng.bytes(end - start), dtype=np.uint8)


def _bench_path(cfg: BenchIoConfig, tag: str) -> Path:
    return cfg.dir / f".offload-bench-{os.getpid()}-{tag}.bin"


def _scratch(path: Path, stack: ExitStack) -> Path:
    """A bench file path, removed when the bench ends however it ends."""
    stack.callback(path.unlink, missing_ok=True)
    return path


def _drop_caches() -> bool:
    """Empties the page cache where permitted (root), so reads come from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _backend_sample(engine: Any, path: Path, src: Any, dst: Any, out: _Samples, dropped: list[bool]) -> None:
    """One timed write (fsync included) and read of the whole lease, then the byte comparison."""
    import torch

    import offload.io as oio

    path.unlink(missing_ok=True)  # every sample writes a new file, as the baseline does
    with oio.open(path, "w", engine=engine) as f:
        t0 = time.perf_counter()
        f.write_from(src).wait()
        f.sync()
        out.write.append(src.nbytes / (time.perf_counter() - t0) / 1e9)
    dst.tensor.zero_()  # so a short or missing read cannot pass verification
    dropped.append(_drop_caches())
    with oio.open(path, "r", engine=engine) as f:
        t0 = time.perf_counter()
        moved = f.read_into(dst).wait()
        out.read.append(src.nbytes / (time.perf_counter() - t0) / 1e9)
    out.verified = out.verified and moved == src.nbytes and torch.equal(src.tensor, dst.tensor)


class _Baseline:
    """hw_probe's disk figures: 8 threads x 8 MiB O_DIRECT pwritev/preadv, fsync in the write."""

    def __init__(self, cfg: BenchIoConfig, stack: ExitStack) -> None:
        self.size = cfg.size
        self.path = _scratch(_bench_path(cfg, "baseline"), stack)
        self.samples = _Samples()
        self.bufs = [mmap.mmap(-1, BASELINE_BLOCK) for _ in range(BASELINE_THREADS)]
        for b in self.bufs:
            stack.callback(b.close)
            b.write(os.urandom(1 << 20) * (BASELINE_BLOCK >> 20))

    def sample(self, dropped: list[bool]) -> None:
        self.path.unlink(missing_ok=True)
        self.samples.write.append(self._pass(write=True))
        dropped.append(_drop_caches())
        self.samples.read.append(self._pass(write=False))

    def _pass(self, write: bool) -> float:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        errors: list[BaseException] = []
        try:
            t0 = time.perf_counter()
            threads = [
                threading.Thread(target=self._worker, args=(fd, i, write, errors))
                for i in range(len(self.bufs))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if write:
                os.fsync(fd)
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
        if errors:
            raise errors[0]
        return self.size / elapsed / 1e9

    def _worker(self, fd: int, i: int, write: bool, errors: list[BaseException]) -> None:
        nblk = -(-self.size // BASELINE_BLOCK)
        io = os.pwritev if write else os.preadv
        view = memoryview(self.bufs[i])
        try:
            for k in range(i, nblk, len(self.bufs)):
                n = min(BASELINE_BLOCK, self.size - k * BASELINE_BLOCK)
                done = io(fd, [view[:n]], k * BASELINE_BLOCK)
                if done != n:
                    raise OSError(f"short {'write' if write else 'read'} of {self.path}: {done} of {n} bytes")
        except BaseException as e:
            errors.append(e)
        finally:
            view.release()


def _measure_h2d(host: Any) -> dict[str, float]:
    """Host-to-device GB/s from the pool lease vs a torch pin_memory tensor of the same size.

    Copies alternate between the two sources, so a drift in the bus or clocks hits both alike.
    """
    import torch

    if not host.is_pinned():
        print("offload bench io: the pool lease is not pinned; h2d measures pageable memory", file=sys.stderr)
    n = host.numel()
    device = torch.empty(n, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8).pin_memory()
    pinned.copy_(host)
    for _ in range(2):  # warm-up: the first copies pay for mappings and clock ramp-up
        device.copy_(host, non_blocking=True)
        device.copy_(pinned, non_blocking=True)
    # Wait for the warm-up so the timed copies do not queue behind it.
    torch.cuda.synchronize()
    pool_s, torch_s = [], []
    for _ in range(H2D_REPS):
        pool_s.append(_timed_copy(host, device))
        torch_s.append(_timed_copy(pinned, device))
    del device, pinned
    pool_GBps = n / statistics.median(pool_s) / 1e9
    torch_GBps = n / statistics.median(torch_s) / 1e9
    return {"pool_GBps": pool_GBps, "torch_pinned_GBps": torch_GBps, "ratio": pool_GBps / torch_GBps}


def _timed_copy(host: Any, device: Any) -> float:
    """Seconds of one host-to-device copy, by CUDA events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    device.copy_(host, non_blocking=True)
    end.record()
    # elapsed_time needs the end event complete; one copy at a time also keeps samples apart.
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3


def host_info(cfg: BenchIoConfig, page_cache_dropped: bool) -> dict[str, Any]:
    import torch

    from offload._version import __version__
    from offload.cli.doctor import fs_type

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "offload": __version__,
        "gpu": gpu,
        "fs_type": fs_type(cfg.dir),
        "page_cache_dropped": page_cache_dropped,
    }


def render(result: dict[str, Any]) -> str:
    """The results as tables: disk bandwidth per backend, then host-to-device copies."""
    base = result["baseline"]
    reps = len(base["samples"]["write_GBps"])
    lines = [
        f"offload bench io: {format_bytes(result['size'])} in {result['dir']}, queue depth "
        f"{result['queue_depth']}, chunk {format_bytes(result['chunk_bytes'])}, median of {reps}",
        "",
    ]
    rows: list[list[object]] = []
    for name, r in result["backends"].items():
        ratio = result["ratios"][name]
        rows.append(
            [
                name,
                r["write_GBps"],
                r["read_GBps"],
                "yes" if r["verified"] else "NO",
                ratio["write"],
                ratio["read"],
            ]
        )
    rows.append(["baseline (8 thr x 8 MiB)", base["write_GBps"], base["read_GBps"], "-", 1.0, 1.0])
    header = ["backend", "write GB/s", "read GB/s", "verified", "write/baseline", "read/baseline"]
    lines.append(format_table(header, rows))
    h2d = result.get("h2d")
    if h2d is not None:
        size = format_bytes(min(result["size"], H2D_MAX))
        h2d_rows: list[list[object]] = [
            ["pool lease", h2d["pool_GBps"], h2d["ratio"]],
            ["torch pin_memory", h2d["torch_pinned_GBps"], 1.0],
        ]
        lines += ["", format_table([f"h2d copy ({size})", "GB/s", "vs torch"], h2d_rows)]
    if not result["host"]["page_cache_dropped"]:
        lines += ["", "note: page cache not dropped (needs root); O_DIRECT bypasses it anyway"]
    return "\n".join(lines)
