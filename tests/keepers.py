"""Test helpers for snapshot keepers: a short scratch directory (socket paths are limited to 107
bytes), and killing a keeper the way a lost node loses it (SIGKILL), waiting until it is gone."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from offload.snapshot.keeper import PIDFILE


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="osnap-", dir="/tmp"))


@contextlib.contextmanager
def keeper_dir() -> Iterator[Path]:
    """A keeper directory (not made yet) under a scratch directory; every keeper under it is killed
    on the way out."""
    base = scratch()
    try:
        yield base / "k"
    finally:
        remove(base)


def kill_keeper(where: Path) -> None:
    """SIGKILLs the keeper of directory where, if one runs there, and waits until it has exited."""
    pidfile = where / PIDFILE
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def remove(base: Path) -> None:
    """Kills every keeper under base (one level down), then removes it."""
    for d in [base, *base.iterdir()] if base.is_dir() else []:
        if d.is_dir():
            kill_keeper(d)
    shutil.rmtree(base, ignore_errors=True)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (init reaps the keeper, which is nobody's child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
