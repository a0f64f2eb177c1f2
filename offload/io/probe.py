"""Probes of what the machine allows: io_uring, and O_DIRECT in a directory."""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from offload import _C

SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")


@dataclass(frozen=True, slots=True)
class UringStatus:
    available: bool
    reason: str
    sysctl_disabled: int | None  # kernel.io_uring_disabled, None where the kernel lacks it


@dataclass(frozen=True, slots=True)
class DirectCheck:
    ok: bool
    reason: str


def probe() -> UringStatus:
    """Whether io_uring can be set up in this process, and why not."""
    try:
        sysctl: int | None = int(SYSCTL.read_text().strip())
    except (OSError, ValueError):
        sysctl = None
    ok, _err, reason = _C.probe_uring()
    if not ok and sysctl:
        reason = f"{reason}; kernel.io_uring_disabled={sysctl}"
    return UringStatus(bool(ok), str(reason), sysctl)


def check_direct(directory: str | os.PathLike[str]) -> DirectCheck:
    """Writes and reads back one 4 KiB block with O_DIRECT in directory."""
    d = Path(directory)
    if not d.is_dir():
        return DirectCheck(False, f"{d} does not exist or is not a directory")
    path = d / f".offload-direct-{uuid.uuid4().hex}"
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    buf.write(b"\xa5" * 4096)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as e:
        return DirectCheck(False, _why(e, d))
    try:
        os.pwritev(fd, [buf], 0)
        os.preadv(fd, [buf], 0)
        return DirectCheck(True, f"O_DIRECT works in {d}")
    except OSError as e:
        return DirectCheck(False, _why(e, d))
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        buf.close()


def _why(e: OSError, d: Path) -> str:
    if e.errno == errno.EINVAL:
        return f"the filesystem of {d} refuses O_DIRECT (tmpfs or similar): {e.strerror}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{d} is not writable: {e.strerror}"
    return f"O_DIRECT failed in {d}: {e.strerror}"
