"""NvmeTier: Adam's m and v of each spilled block in a file on NVMe, staged through 3 leases.

One file per block, m and v back to back, each padded to 4096 bytes (O_DIRECT's alignment), moved
whole through ``offload.io``. With ``master=True`` (``placement.master: nvme``) the block's fp32
master comes first in the file, so the three arrays move together; the record keeps only a meta
placeholder, and host RAM only the block's pinned wire copy and gradient. Blocks are striped round-robin over ``nvme_dirs`` (one directory per
drive), in a per-run subdirectory that ``close()`` removes. Files are zero-filled at wrap time, so
the first read is real I/O and a full disk fails at wrap rather than mid-run.

Host memory holds three blocks' state, in leases of a small pool: the next block's being read
ahead (``prefetch``), the current one's being updated (``acquire``), the previous one's being
written behind (``release``). A lease goes back to the pool only once its write has completed. The
optimizer's worker thread makes every call but ``flush()``/``close()``, which run on the training
thread while the worker is idle; a lock orders them anyway.

Across steps: the blocks are updated in the same order every step, so the tier remembers the
order of the last round of acquires, and each ``release`` also reads ahead the block that came
next in that order, wrapping around: releasing the round's last block starts reading the next
step's first one while forward and backward run, instead of leaving the disk idle until that
update asks for it. That read takes only a lease that is free or holds a settled block (never a
wait); a guess that turns out wrong costs one read and is evicted like any staged block.

One transfer at a time: the tier's reads and writes go to the disk in the order asked, each
started when the one before has finished (``_Serial``). Writing block i-1 back while reading block
i+1 ahead at once is slower on the disks this was measured on (a virtio disk: 3.1 s per 13B
block's m and v both ways at once against 2.3 s one after the other); the next update waits for
its read either way, and the queue never runs dry while the disk is the bottleneck.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from offload import io as oio
from offload.config import Tier
from offload.memory import PinnedPool
from offload.memory.arena import Lease
from offload.memory.pool import PoolExhausted
from offload.store.record import BlockRecord
from offload.store.tiers.base import Held
from offload.store.tiers.dirs import check_dir, run_dir

ALIGN = 4096
STAGED_BLOCKS = 3  # read-ahead, current, write-behind


def _half_bytes(numel: int) -> int:
    """Bytes of m (and of v) in a block's file: fp32, padded to O_DIRECT's alignment."""
    return -(-max(numel, 1) * 4 // ALIGN) * ALIGN


@dataclass(slots=True, eq=False)
class _Transfer:
    """A read or write waiting its turn in ``_Serial``; the IoFuture's face (wait, done, path,
    nbytes) for the rest of the tier."""

    start: Callable[[], oio.IoFuture]
    path: str
    nbytes: int
    finished: threading.Event = field(default_factory=threading.Event)
    error: OSError | None = None

    def done(self) -> bool:
        return self.finished.is_set()

    def wait(self) -> None:
        self.finished.wait()
        if self.error is not None:
            raise self.error


class _Serial:
    """A thread that starts the tier's transfers one at a time, in the order submitted."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Transfer | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="offload-nvme-tier", daemon=True)
        self._thread.start()

    def submit(self, f: oio.DirectFile, lease: Lease, write: bool) -> _Transfer:
        move = f.write_from if write else f.read_into
        t = _Transfer(lambda: move(lease, 0), f.path, lease.nbytes)
        self._queue.put(t)
        return t

    def close(self) -> None:
        """Ends the thread after the transfers already submitted."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (t := self._queue.get()) is not None:
            try:
                t.start().wait()
            except OSError as e:
                t.error = e
            finally:
                t.finished.set()


@dataclass(slots=True, eq=False)
class _Staged:
    """One block's state in a lease, with the read or write moving it (None: settled)."""

    lease: Lease
    io: _Transfer | None
    name: str
    """The block's record name (block.N), for errors."""
    acquired: bool = False


class NvmeTier:
    """See the module docstring."""

    def __init__(self, dirs: Sequence[str], numel: int, *, master: bool = False) -> None:
        for i, d in enumerate(dirs):
            check_dir(d, i)
        self.dirs = [run_dir(d) for d in dirs]
        self.master = master
        self._halves = 3 if master else 2  # [master,] m, v
        self._engine = oio.Engine()
        self._serial = _Serial()
        slot = self._halves * _half_bytes(numel)
        self._pool = PinnedPool(
            STAGED_BLOCKS * slot, arena_bytes=STAGED_BLOCKS * slot, pin=False, name="nvme-staging"
        )
        self._pool.attach_io(self._engine)  # registered buffers where io_uring takes them
        self._files: dict[int, oio.DirectFile] = {}  # block index -> its file
        self._names: dict[int, str] = {}  # block index -> its record's name (for errors)
        self._sizes: dict[int, int] = {}  # block index -> bytes of its staged state (its file's size)
        self._staged: dict[int, _Staged] = {}  # block index -> staged state, least recently used first
        self._round: list[int] = []  # block indices in the order acquired since the round began
        self._last_round: list[int] = []  # the round before (the order to read ahead in)
        self._lock = threading.Lock()
        self._failed: OSError | None = None
        self._closed = False

    def path(self, rec: BlockRecord) -> str:
        """The file that holds rec's state: m at offset 0 and v at ``_half_bytes(rec.numel)``;
        with masters, the master at 0, m and v one and two halves further."""
        return self._files[rec.index].path

    def place(self, rec: BlockRecord) -> None:
        d = self.dirs[len(self._files) % len(self.dirs)]
        f = oio.open(d / f"{rec.name}.adam", "x", engine=self._engine)
        self._files[rec.index] = f
        self._names[rec.index] = rec.name
        nbytes = self._sizes[rec.index] = self._halves * _half_bytes(rec.numel)
        with self._pool.lease(nbytes, purpose="zero-fill") as lease:
            lease.tensor.zero_()
            if self.master:
                lease.tensor[: rec.numel * 4].view(torch.float32).copy_(rec.master)
            try:
                f.allocate(nbytes)  # a disk without room fails here, at wrap
                f.write_from(lease, 0).wait()  # the lease is reused at once: wait for the write
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"nvme tier: filling {rec.name}'s file ({nbytes} bytes) failed: {e.strerror}",
                    f.path,
                ) from e
        rec.exp_avg = rec.exp_avg_sq = None
        if self.master:  # the file holds it now: the record keeps a placeholder without memory
            rec.master = torch.empty(rec.numel, dtype=torch.float32, device="meta")

    def prefetch(self, rec: BlockRecord) -> None:
        with self._lock:
            self._check()
            if rec.index not in self._staged:  # else already read, in use, or still in memory
                self._read(rec)

    def acquire(self, rec: BlockRecord) -> Held:
        with self._lock:
            self._check()
            st = self._staged.get(rec.index) or self._read(rec)
            if st.acquired:
                raise RuntimeError(f"{rec.name}'s optimizer state acquired twice without release")
            # Host wait: the kernel must not read m and v before the read lands, nor overwrite
            # them while a previous write-back of this block is still copying them out.
            self._settle(rec.index, st)
            st.acquired = True
            self._touch(rec.index)
            if rec.index in self._round:  # a block's second update: a new round (a new step)
                self._last_round, self._round = self._round, []
            self._round.append(rec.index)
            half, n = _half_bytes(rec.numel), rec.numel * 4
            arrays = [
                st.lease.tensor[k * half : k * half + n].view(torch.float32) for k in range(self._halves)
            ]
            return Held(*arrays) if self.master else Held(rec.master, *arrays)

    def release(self, rec: BlockRecord) -> None:
        with self._lock:
            st = self._staged.get(rec.index)
            if st is None or not st.acquired:
                raise RuntimeError(f"{rec.name}'s optimizer state released without acquire")
            st.acquired = False
            st.io = self._serial.submit(self._files[rec.index], st.lease, write=True)  # waited on eviction
            self._touch(rec.index)
            ahead = self._after(rec.index)
            if ahead is not None and ahead not in self._staged:
                self._read_if_free(ahead)

    def flush(self) -> None:
        with self._lock:
            self._check()
            for index, st in list(self._staged.items()):
                self._settle(index, st)

    def close(self) -> None:
        """Waits for what is in flight (its errors were or will not be reported: the run is over),
        then closes the files and removes the run's directories."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for st in self._staged.values():
                if st.io is not None:
                    with contextlib.suppress(OSError):
                        st.io.wait()
                st.lease.release()
            self._staged.clear()
            self._serial.close()
            for f in self._files.values():
                f.close()
            self._pool.detach_io(self._engine)
            self._pool.close()
            self._engine.close()
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)

    def stored_bytes(self, tier: Tier | None = None) -> int:
        if tier not in (None, Tier.NVME):
            return 0
        return sum(f.size() for f in self._files.values())

    # ---- staging ---------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("the nvme optimizer-state tier is closed")
        if self._failed is not None:  # the files no longer hold the state: refuse to go on
            raise self._failed

    def _read(self, rec: BlockRecord) -> _Staged:
        lease = self._lease(self._halves * _half_bytes(rec.numel))
        st = _Staged(lease, self._serial.submit(self._files[rec.index], lease, write=False), rec.name)
        self._staged[rec.index] = st
        return st

    def _after(self, index: int) -> int | None:
        """The block acquired after index in the last full round; after that round's last block,
        the first of the round under way (the next step's first update). None before a round is
        complete (the first step): the order is not known yet."""
        order = self._last_round
        if index not in order:
            return None
        k = order.index(index) + 1
        return order[k] if k < len(order) else self._round[0]

    def _read_if_free(self, index: int) -> None:
        """Starts reading index's state into a lease that is free or holds a block whose transfer
        is done (evicting it); does nothing rather than wait."""
        f, nbytes = self._files[index], self._sizes[index]
        try:
            lease = self._pool.lease(nbytes, purpose="adam state")
        except PoolExhausted:
            victim = next(
                (i for i, st in self._staged.items() if not st.acquired and (st.io is None or st.io.done())),
                None,
            )
            if victim is None:
                return
            st = self._staged[victim]
            self._settle(victim, st)  # no wait (its transfer is done); a failed write raises here
            del self._staged[victim]
            st.lease.release()
            lease = self._pool.lease(nbytes, purpose="adam state")
        self._staged[index] = _Staged(lease, self._serial.submit(f, lease, write=False), self._names[index])

    def _lease(self, nbytes: int) -> Lease:
        """A staging lease; when all are out, frees the least recently used one not in use."""
        while True:
            try:
                return self._pool.lease(nbytes, purpose="adam state")
            except PoolExhausted:
                victim = next((i for i, st in self._staged.items() if not st.acquired), None)
                if victim is None:
                    raise RuntimeError(
                        f"all {STAGED_BLOCKS} nvme staging buffers hold acquired optimizer state"
                    ) from None
                st = self._staged[victim]
                self._settle(victim, st)  # a buffer goes back only after its read or write is done
                del self._staged[victim]
                st.lease.release()

    def _settle(self, index: int, st: _Staged) -> None:
        """Host wait for st's transfer. A failed one leaves the file behind the state: the tier
        refuses all further work with the same error, which names the tier, the block and the
        bytes (a full disk: "No space left on device (the disk is full) during write of ...")."""
        if st.io is None:
            return
        io = st.io
        try:
            io.wait()
        except OSError as e:
            what = "master, m and v" if self.master else "m and v"
            self._failed = OSError(
                e.errno,
                f"nvme tier: moving {st.name}'s {what} ({io.nbytes} bytes) failed: {e.strerror}; "
                "the tier holds no consistent state now, so the run stops (resume from the last "
                "checkpoint)",
                io.path,
            )
            del self._staged[index]
            st.lease.release()
            raise self._failed from e
        st.io = None

    def _touch(self, index: int) -> None:
        self._staged[index] = self._staged.pop(index)  # most recently used last
