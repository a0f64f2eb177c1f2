"""``offload doctor``: checks, one line each, whether this machine can run offload and how well.

Each probe returns a status (ok, warn, fail, n/a) and a detail; a probe that raises becomes a
warning (or a failure, for the few required ones) carrying the exception, so the report always
completes. The command fails only when a required check fails: the native extension, the
directory offload would write to, or the I/O engine (neither io_uring nor the thread pool works).
No GPU is a warning: compute then runs on the CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from offload.utils.sizes import format_bytes

Status = Literal["ok", "warn", "fail", "n/a"]
CAP_IPC_LOCK = 14
LOW_DISK = 1 << 30
ROUND_TRIP = 1 << 20


@dataclass(slots=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    required: bool = False
    """A failure here means offload cannot run on this machine."""


@dataclass(slots=True)
class _Context:
    """What later probes need from earlier ones."""

    dir: Path
    dir_ok: bool = False
    direct_ok: bool = False


Probe = Callable[[_Context], tuple[Status, str]]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "doctor",
        help="check that this machine can run offload",
        description="Check GPUs, pinned memory, io_uring, O_DIRECT, NUMA/CXL, disk and memory limits.",
    )
    p.add_argument("--dir", default=".", help="directory offload would write to (default: current directory)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checks = run_checks(Path(os.path.abspath(args.dir)))
    ok, verdict = summarize(checks)
    if args.json:
        report = {
            "offload": _version(),
            "dir": os.path.abspath(args.dir),
            "checks": [asdict(c) for c in checks],
            "ok": ok,
            "verdict": verdict,
        }
        print(json.dumps(report, indent=2))
    else:
        print(render(checks, verdict, os.path.abspath(args.dir)))
    return 0 if ok else 1


def run_checks(directory: Path) -> list[Check]:
    """Runs every probe in order (the directory before what writes into it)."""
    ctx = _Context(dir=directory)
    return [_guarded(name, required, probe, ctx) for name, required, probe in PROBES]


def summarize(checks: list[Check]) -> tuple[bool, str]:
    failed = [c for c in checks if c.required and c.status == "fail"]
    if failed:
        return False, "offload cannot run here: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
    warned = sum(c.status in ("warn", "fail") for c in checks)
    note = f" ({warned} warning{'s' if warned != 1 else ''})" if warned else ""
    return True, f"offload can run here{note}"


def render(checks: list[Check], verdict: str, directory: str) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"offload doctor {_version()}, directory {directory}", ""]
    lines += [f"{c.name.ljust(width)}  {c.status.ljust(4)}  {c.detail}" for c in checks]
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines)


def _guarded(name: str, required: bool, probe: Probe, ctx: _Context) -> Check:
    try:
        status, detail = probe(ctx)
    except Exception as e:  # a broken probe is a finding, not a crash
        status, detail = ("fail" if required else "warn"), f"probe raised {type(e).__name__}: {e}"
    return Check(name, status, detail, required)


def _version() -> str:
    from offload._version import __version__

    return __version__


def _offload(ctx: _Context) -> tuple[Status, str]:
    try:
        import offload._C  # noqa: F401
    except ImportError as e:
        return "fail", f"native extension offload._C does not load ({e}); rebuild with pip install -e ."
    import torch

    return (
        "ok",
        f"{_version()}, native extension loaded, torch {torch.__version__}, Python {platform.python_version()}",
    )


def _gpu(ctx: _Context) -> tuple[Status, str]:
    import torch

    if not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        return "warn", f"{why} (torch {torch.__version__}): compute runs on the CPU"
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(f"{i}: {props.name} {format_bytes(props.total_memory)}")
    return (
        "ok",
        f"{len(devices)} x [{'; '.join(devices)}], driver {_nvidia_driver()}, CUDA {torch.version.cuda}",
    )


def _nvidia_driver() -> str:
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else "unknown"


def _cuda_host_register(ctx: _Context) -> tuple[Status, str]:
    import torch

    from offload.memory import cuda

    if not torch.cuda.is_available():
        return "n/a", "no CUDA device: the pinned pool works unpinned"
    nbytes = 2 << 20
    buf = mmap.mmap(-1, nbytes)  # page-aligned, like a pool arena
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        cuda.host_register(ctypes.addressof(anchor), nbytes)
    except cuda.PinError as e:
        return "warn", f"{e}: host memory stays pageable (H2D copies several times slower)"
    else:
        cuda.host_unregister(ctypes.addressof(anchor))
        return "ok", f"cudaHostRegister of a {format_bytes(nbytes)} mmap buffer works"
    finally:
        del anchor  # the buffer export must end before the mmap can close
        buf.close()


def _host_ram(ctx: _Context) -> tuple[Status, str]:
    import psutil

    vm = psutil.virtual_memory()
    return "ok", f"{format_bytes(vm.total)} total, {format_bytes(vm.available)} available"


def _numa(ctx: _Context) -> tuple[Status, str]:
    from offload.memory import numa

    nodes = [n for n in numa.list_nodes() if _node_bytes(n) > 0]
    if not nodes:
        return "ok", "no NUMA information (single node assumed)"
    parts = []
    for n in nodes:
        kind = "CPUs" if n.has_cpus else "no CPUs (CXL candidate)"
        parts.append(f"node{n.id} {format_bytes(_node_bytes(n))} {kind}")
    cxl = sum(not n.has_cpus for n in nodes)
    memory_only = f"{cxl} without CPUs (CXL candidates)" if cxl else "none without CPUs (no CXL memory)"
    summary = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} with memory, {memory_only}"
    return "ok", f"{summary}: {', '.join(parts)}"


def _node_bytes(node: Any) -> int:
    """Memory of a NUMA node record (``mem_total`` in offload.memory.numa, ``mem_bytes`` in the spec)."""
    return int(getattr(node, "mem_total", None) or getattr(node, "mem_bytes", 0) or 0)


def _memlock(ctx: _Context) -> tuple[Status, str]:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else format_bytes(soft)
    if soft == resource.RLIM_INFINITY:
        return "ok", "RLIMIT_MEMLOCK unlimited"
    if os.geteuid() == 0 or _has_cap_ipc_lock():
        return "ok", f"RLIMIT_MEMLOCK {limit}, bypassed: running as root or with CAP_IPC_LOCK"
    return "warn", (
        f"RLIMIT_MEMLOCK {limit}: pool memory beyond it cannot be locked or registered with io_uring; "
        "raise it (ulimit -l unlimited, memlock in /etc/security/limits.conf) or grant CAP_IPC_LOCK"
    )


def _has_cap_ipc_lock() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _directory(ctx: _Context) -> tuple[Status, str]:
    d = ctx.dir
    if not d.exists():
        return "fail", f"{d} does not exist"
    if not d.is_dir():
        return "fail", f"{d} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".offload-doctor-"):
            pass
    except OSError as e:
        return "fail", f"{d} is not writable: {e.strerror or e}"
    ctx.dir_ok = True
    return "ok", f"{d} is writable ({fs_type(d)})"


def _disk_free(ctx: _Context) -> tuple[Status, str]:
    if not ctx.dir_ok:
        return "n/a", "directory unusable"
    usage = shutil.disk_usage(ctx.dir)
    detail = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"
    if usage.free < LOW_DISK:
        return "warn", f"only {detail}: too little for an NVMe tier or checkpoints"
    return "ok", detail


def _o_direct(ctx: _Context) -> tuple[Status, str]:
    import offload.io as oio

    if not ctx.dir_ok:
        return "n/a", "directory unusable"
    check = oio.check_direct(ctx.dir)
    if not check.ok:
        return "warn", f"{check.reason}: an NVMe tier needs O_DIRECT, so put it on a disk-backed directory"
    ctx.direct_ok = True
    return "ok", check.reason


def _io_uring(ctx: _Context) -> tuple[Status, str]:
    import offload.io as oio

    st = oio.probe()
    sysctl = "absent" if st.sysctl_disabled is None else str(st.sysctl_disabled)
    if st.available:
        return "ok", f"{st.reason} (kernel.io_uring_disabled {sysctl})"
    return "warn", f"{st.reason} (kernel.io_uring_disabled {sysctl}): the threads backend is used instead"


def _io_threads(ctx: _Context) -> tuple[Status, str]:
    import offload.io as oio

    with oio.Engine(backend="threads") as engine:
        return "ok", f"{engine.backend} engine starts (the fallback where io_uring is refused)"


def _io_engine(ctx: _Context) -> tuple[Status, str]:
    import offload.io as oio

    try:
        engine = oio.Engine(backend="auto")
    except Exception as e:
        return "fail", f"no io backend works: {type(e).__name__}: {e}"
    with engine:
        env = os.environ.get("OFFLOAD_IO_BACKEND")
        why = (
            f" (OFFLOAD_IO_BACKEND={env})"
            if env
            else f" ({engine.fallback_reason})"
            if engine.fallback_reason
            else ""
        )
        chosen = f"auto selects {engine.backend}{why}"
        if not ctx.dir_ok:
            return "ok", f"{chosen}; round trip skipped: directory unusable"
        _round_trip(engine, ctx)
        mode = "O_DIRECT" if ctx.direct_ok else "buffered"
        return "ok", f"{chosen}; {format_bytes(ROUND_TRIP)} {mode} write and read back verified"


def _round_trip(engine: Any, ctx: _Context) -> None:
    import offload.io as oio

    src, dst = mmap.mmap(-1, ROUND_TRIP), mmap.mmap(-1, ROUND_TRIP)  # page-aligned for O_DIRECT
    src.write(os.urandom(ROUND_TRIP))
    fd, name = tempfile.mkstemp(dir=ctx.dir, prefix=".offload-doctor-")
    os.close(fd)
    try:
        with oio.open(name, "w", direct=ctx.direct_ok, engine=engine) as f:
            f.write_from(memoryview(src)).wait()
            f.sync()
        with oio.open(name, "r", direct=ctx.direct_ok, engine=engine) as f:
            moved = f.read_into(memoryview(dst)).wait()
        if moved != ROUND_TRIP or src[:] != dst[:]:
            raise OSError(f"round trip through {engine.backend} returned different bytes ({moved} read)")
    finally:
        os.unlink(name)
        src.close()
        dst.close()


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding path, from /proc/mounts ("unknown" elsewhere)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    real = os.path.realpath(path)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, fields[2]
    return kind


PROBES: list[tuple[str, bool, Probe]] = [
    ("offload", True, _offload),
    ("gpu", False, _gpu),
    ("cuda host register", False, _cuda_host_register),
    ("host ram", False, _host_ram),
    ("numa", False, _numa),
    ("memlock", False, _memlock),
    ("directory", True, _directory),
    ("disk free", False, _disk_free),
    ("o_direct", False, _o_direct),
    ("io_uring", False, _io_uring),
    ("io threads", False, _io_threads),
    ("io engine", True, _io_engine),
]
