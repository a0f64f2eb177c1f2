"""SnapshotConfig: how often, how much parity, where; SnapshotStats and SnapshotHandle: one snapshot."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal

from offload.config import ConfigError, check_fields
from offload.snapshot.keeper import DEFAULT_IDLE_TIMEOUT


@dataclass(kw_only=True, slots=True)
class SnapshotConfig:
    """In-memory snapshots of a wrapped run (docs/snapshot.md)."""

    every: int | Literal["auto"] = "auto"
    """Steps between snapshots (``Snapshotter.maybe_snapshot``). auto: every step while a
    snapshot's stall (its call plus the optimizer's holds) stays under ``budget`` of a step, else
    the fewest steps apart that keep it there; re-decided at each snapshot, agreed by all ranks."""
    budget: float = 0.03
    """The share of training time auto lets snapshots cost."""
    parity: int | None = None
    """m: parity cells per stripe, the number of nodes that may be lost at once. None: 1 when the
    job spans two or more nodes (keepers), else 0 (a lone node survives trainer crashes only)."""
    buffers: int = 2
    """Segments per rank, written in turn: with 2 the last committed snapshot stays intact while the
    next is written, so a crash at any moment leaves one; with 1 a crash during a snapshot loses it
    (half the memory)."""
    job: str = "default"
    """Names this run's snapshots in the keepers: a restarted run must use the same name."""
    dir: str | None = None
    """The keeper's directory; "{rank}" and "{local_rank}" are replaced (a keeper per rank, as the
    tests run it). None: $OFFLOAD_SNAPSHOT_DIR, else /dev/shm/offload-<uid>."""
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT
    """A keeper with no trainer connected for this long ends, dropping its snapshots."""
    flush_dir: str | None = None
    """Where ``flush()`` and SIGTERM write snapshots to disk, and where ``restore()`` looks when the
    memory is lost (for flushed snapshots and ``offload.save`` checkpoints)."""
    checkpoint_dir: str | None = None
    """Where else ``restore()`` looks for ``offload.save`` checkpoints (the root given to save; every
    rank must see it: a shared filesystem) when the keepers lost the snapshot: only when some
    keeper still holds a step of the job, the trace of a crash (a finished run leaves its last
    checkpoint there too). ``offload train`` sets it to ``train.checkpoint_dir``."""
    lazy: bool = True
    """Capture host records in the background, each before its next update (a capture fence, as
    checkpoints do); False: capture everything inside ``snapshot()``."""
    piece_bytes: int = 16 << 20
    """Bytes of a chunk moved per round of the parity exchange (a leader holds k + m of them)."""
    timeout_s: float = 300.0
    """Timeout of the snapshot process group's collectives (a rank that died mid-exchange)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.every, int) and self.every < 1:
            raise ConfigError("every", self.every, "must be >= 1 or 'auto'")
        if not 0 < self.budget < 1:
            raise ConfigError("budget", self.budget, "must be between 0 and 1")
        if self.parity is not None and self.parity < 0:
            raise ConfigError("parity", self.parity, "must be >= 0 (or null for the default)")
        if self.buffers not in (1, 2):
            raise ConfigError("buffers", self.buffers, "must be 1 or 2")
        for name in ("idle_timeout_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be > 0")
        if self.piece_bytes < 4096:
            raise ConfigError("piece_bytes", self.piece_bytes, "must be >= 4096")


@dataclass(frozen=True, slots=True)
class SnapshotStats:
    """What a finished snapshot measured, on this rank."""

    step: int
    payload: int
    """Bytes of this rank's snapshot: its index and records."""
    segment: int
    """Bytes of its segment in the keeper: the payload cut into k chunks (padded) plus m cells."""
    call_s: float
    """How long snapshot() blocked (waiting for the snapshot before included)."""
    hold_s: float
    """How long the optimizer's worker waited for records to be captured."""
    capture_s: float
    """From the call to this rank's data committed."""
    parity_s: float
    """The parity exchange and commit."""
    seconds: float
    """From the call to the snapshot committed (data and parity)."""

    @property
    def stall_s(self) -> float:
        """Training time the snapshot may have cost (an upper bound, as for checkpoints)."""
        return self.call_s + self.hold_s


class SnapshotHandle:
    """A snapshot in flight or done: ``wait()`` raises its error; ``stats`` once done."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._stats: SnapshotStats | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> SnapshotStats:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the snapshot of step {self.step} is still in flight")
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    @property
    def stats(self) -> SnapshotStats:
        if self._stats is None:
            raise RuntimeError(f"the snapshot of step {self.step} is still in flight")
        return self._stats


def interval(stall_s: float, step_s: float, budget: float) -> int:
    """Steps between snapshots so that their stall costs at most budget of the training time."""
    if step_s <= 0 or stall_s <= 0:
        return 1
    return max(1, math.ceil(stall_s / (budget * step_s)))


def memory_factor(nodes: int, parity: int | None = None, buffers: int = 2) -> float:
    """The keeper's memory as a multiple of a rank's snapshot payload: buffers * (k + m) / k for
    a coding group of ``nodes`` nodes (the planner's ``snapshot`` row)."""
    k, m = _code(nodes, parity, buffers)
    return buffers * (k + m) / k


def memory_note(nodes: int, parity: int | None, buffers: int, row: int) -> str:
    """How to read the plan's ``snapshot`` row (row: its bytes): the code over ``nodes`` nodes
    and the multiple of the rank's state it comes to (``offload plan --snapshot-nodes``)."""
    from offload.utils.sizes import format_bytes

    k, m = _code(nodes, parity, buffers)
    factor = buffers * (k + m) / k
    return (
        f"snapshot: {nodes} node(s), stripes of k = {k} data + m = {m} parity chunk(s): each rank's "
        f"snapshot takes (k + m) / k = {(k + m) / k:.2f} x its master, m and v in its node's keeper, "
        f"per buffer; x {buffers} buffer(s): {format_bytes(round(row / factor))} x {factor:.2f} = "
        f"{format_bytes(row)} per rank (the snapshot row)"
    )


def _code(nodes: int, parity: int | None, buffers: int) -> tuple[int, int]:
    """(k, m) of a coding group of ``nodes`` nodes; ConfigError or TopologyError on bad values."""
    from offload.snapshot.topology import node_keys_to_topology

    SnapshotConfig(parity=parity, buffers=buffers)  # the checks and messages of the config's fields
    t = node_keys_to_topology([str(n) for n in range(nodes)], 0, parity)
    return t.k, t.m
