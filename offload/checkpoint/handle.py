"""SaveHandle: a checkpoint save in flight or done, and SaveStats, what it measured."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SaveHandle", "SaveStats"]


@dataclass(frozen=True, slots=True)
class SaveStats:
    """What a finished save measured."""

    step: int
    bytes: int
    """Bytes written: every file and the manifest."""
    seconds: float
    """From the save() call to the commit (and retention) done."""
    write_s: float
    """The writer thread's time, from its start to the commit, less ring_s."""
    call_s: float
    """How long save() blocked its caller (waiting for the save before it included)."""
    waited_s: float
    """Of call_s: waiting for the save before this one to finish."""
    hold_s: float
    """How long the optimizer's worker waited for records to be captured."""
    device_copy: str
    """Where the device records were snapshotted: "device", "host", or "none"."""
    reused_bytes: int = 0
    """Of bytes: written over the files of a surplus step, in place (``prune="before"``)."""
    prune_s: float = 0.0
    """Of write_s: taking surplus steps out (``prune="before"``) and pruning after the commit."""
    commit_s: float = 0.0
    """Of write_s: from the last record staged to the end: the last writes, fsyncs, manifest,
    renames and the prune after the commit."""
    capture_s: float = 0.0
    """From the save() call to the last host record captured: the longest the optimizer's worker
    could be held (0 without host records)."""
    ring_s: float = 0.0
    """Making the staging ring (a runtime's first save, or a new size): mapping, pinning."""
    ready_wait_s: float = 0.0
    """Of write_s: waiting for optimizer updates queued before save() (the state to capture)."""
    copy_s: float = 0.0
    """Of write_s: copying into staging (host memcpy; waiting for device-to-host copies)."""
    write_wait_s: float = 0.0
    """Of write_s: waiting for the disk (a staging chunk's write before refilling it; the last ones)."""
    crc_wait_s: float = 0.0
    """Of write_s: waiting for crc32 sums (a chunk whose write was done but not its sums)."""

    @property
    def gbps(self) -> float:
        """Flush throughput: bytes / write_s, in GB/s."""
        return self.bytes / self.write_s / 1e9 if self.write_s > 0 else math.inf

    @property
    def stall_s(self) -> float:
        """Training time the save may have cost: the call, plus the worker's holds (a held update
        delays the next forward only if it reaches that block first, so this is an upper bound)."""
        return self.call_s + self.hold_s


class SaveHandle:
    """A save in flight or done. ``wait()`` returns the committed directory or raises the save's
    error; ``path`` is where the step is (or will be) committed; ``stats`` once done."""

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        self.step = step
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stats: SaveStats | None = None
        self._reported = False  # wait() raised the error: nobody needs to be told again at exit

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Path:
        """Blocks until the save is committed (returns its path) or failed (raises its error)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the save of {self.path} is still in flight after {timeout} s")
        if self._thread is not None:
            self._thread.join()  # a thread that ran torch ops must be gone before torch is torn down
            self._thread = None
        if self._error is not None:
            self._reported = True
            raise self._error
        return self.path

    @property
    def stats(self) -> SaveStats:
        if self._stats is None:
            raise RuntimeError(f"the save of {self.path} is still in flight: wait() for it first")
        return self._stats

    def __repr__(self) -> str:
        return f"SaveHandle({str(self.path)!r}, done={self.done()})"
