"""NvmeStore: block-boundary states on NVMe, through a few pinned staging leases.

Forward: each group is copied device-to-host into a staging lease on a side stream, then written
with O_DIRECT through ``offload.io`` to this run's file in one of ``nvme_dirs`` (groups
round-robin over the directories, one per drive), padded to 4096 bytes. The write can only start
once the copy has landed; rather than block the training thread on that, the store polls at each
call and submits the writes whose copies are done (a write is forced only when its lease is
needed). Backward: the groups wanted next are read back into staging leases ``depth`` ahead and
copied to the device once read. A group still in its staging lease is never read back.

Host memory holds ``staging`` groups (at first 4: two being written or read ahead, one in use,
one spare); when all are out, the oldest written group's lease is reclaimed, after a host wait
for its write, which is exactly the disk's shortfall. A failed write (a full disk) raises from the
call that waits for it.

Where the disk writes slower than the forward computes, the forward waits at every put once the
leases are out; more leases let it run further ahead, and the groups still in their leases when
backward begins are never read back. Under ``offload_saved: auto`` the cost model decides how
many (offload.plan.recompute.choose_staged: they draw on the host memory keeps would take) and
calls :meth:`NvmeStore.grow_to`. Otherwise, given ``room`` (the host bytes the store may still
take), the store grows them itself when a forward ends (at the first backward fetch), from what
that forward waited: a forward of n groups in t seconds that waited w of them for the disk would
run at its own pace with about n * w / t groups leased (the disk writes a group in t / n,
compute makes one in (t - w) / n, and the forward stays ahead with n * (1 - compute / disk) in
leases). The host clock runs ahead of the device, so (t - w) / n understates compute and that
count overstates the need: each growth adds half of it, and a forward that still waits adds
again. The leases grow at most to one per group of a forward (with as many, backward reads
nothing back and needs none for its read-ahead), within
``room``; ``growth`` says what grew and why.

Each directory holds one file per run, in a subdirectory removed at ``close()`` (or when the
store is garbage-collected, or at exit).

``clock`` (a :class:`DiskClock`) times the disk's transfers while someone asks it to
(``offload_saved: auto`` over its measured pass): what the disk delivered, for the cost model.
"""

from __future__ import annotations

import collections
import math
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from offload import io as oio
from offload.engine.activations import DEPTH, CudaWait, Home, OffloadingStore, Stored
from offload.engine.device import Device
from offload.memory import PinnedPool
from offload.memory.arena import Lease
from offload.memory.pool import PoolExhausted
from offload.store.tiers.dirs import check_dir, run_dir

ALIGN = 4096
STAGING = 4
WAIT_SHARE = 0.01
"""A forward that waited for the disk less than this share of its time does not grow the leases."""


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(slots=True, eq=False)
class _File:
    """One directory's file. Space is handed out from ``cursor`` on and reused from 0 once no
    group in the file is live and no transfer on it is in flight (``live`` counts both)."""

    file: oio.DirectFile
    cursor: int = 0
    live: int = 0


@dataclass(slots=True)
class DiskTime:
    """Bytes moved one way, and the seconds the disk was busy moving them."""

    nbytes: int = 0
    seconds: float = 0.0


class DiskClock:
    """The bytes the store's writes and reads moved between ``start()`` and ``stop()``, and the
    seconds the disk was busy with them: each transfer counts from its submission to its
    completion, and time when several of one direction are in flight counts once, so bytes over
    seconds is the bandwidth the disk delivered at the store's own depth.

    The training thread sees a completion only when it next polls the store (at the next block):
    timed there, a disk that keeps pace with compute would be charged a block's compute per
    transfer. A watcher thread waits for each transfer instead, in submission order (the native
    wait releases the GIL), and stamps its completion; a transfer that completes before an
    earlier one is stamped with it, which the union of busy time absorbs (the earlier one was
    still in flight). It runs only while started."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[oio.IoFuture, bool, float]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._running = False
        self._written, self._read = DiskTime(), DiskTime()
        self._until = {True: 0.0, False: 0.0}  # per direction (write?): the latest completion

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Starts counting from zero (transfers already in flight are not counted)."""
        with self._cond:
            if self._running:
                return
            self._running = True
            self._written, self._read = DiskTime(), DiskTime()
            self._until = {True: 0.0, False: 0.0}
            self._thread = threading.Thread(target=self._watch, name="offload-disk-clock", daemon=True)
            self._thread.start()

    def submitted(self, fut: oio.IoFuture, write: bool) -> oio.IoFuture:
        """Times fut (a write, or a read) when running; returns it."""
        with self._cond:
            if self._running:
                self._queue.append((fut, write, time.perf_counter()))
                self._cond.notify_all()
        return fut

    def stop(self) -> tuple[DiskTime, DiskTime]:
        """(written, read) since the last start(), once the transfers submitted until now are
        done; the watcher ends. Zeros when never started."""
        with self._cond:
            thread, self._running = self._thread, False
            self._thread = None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # it drains the queue first
        return replace(self._written), replace(self._read)

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._running:
                    self._cond.wait()
                if not self._queue:
                    return
                fut, write, start = self._queue[0]
            try:
                nbytes = fut.wait()
            except OSError:  # raised to whoever waits for it in the store; moved nothing here
                nbytes = 0
            end = time.perf_counter()
            with self._cond:
                self._queue.popleft()
                if nbytes:
                    moved = self._written if write else self._read
                    moved.nbytes += nbytes
                    moved.seconds += max(end - max(start, self._until[write]), 0.0)
                    self._until[write] = max(self._until[write], end)


class _Spill:
    """The copy out of one group to disk: device-to-host into its lease, then the write. Polling
    (``done``) submits the write once the copy has landed; ``wait`` forces it."""

    __slots__ = ("copy", "io", "submit")

    def __init__(self, event: Any, submit: Callable[[], oio.IoFuture]) -> None:
        self.copy = CudaWait(event)
        self.submit = submit
        self.io: oio.IoFuture | None = None

    def start(self) -> bool:
        if self.io is None and self.copy.done():
            self.io = self.submit()
        return self.io is not None

    def done(self) -> bool:
        return self.start() and self.io is not None and self.io.done()

    def wait(self) -> int:
        if self.io is None:
            self.copy.wait()  # host wait: the write must not read the lease before the copy lands
            self.io = self.submit()
        return self.io.wait()


class NvmeStore(OffloadingStore):
    """See the module docstring."""

    purpose = "activations-nvme"

    def __init__(
        self,
        device: Device,
        blocks: int,
        dirs: Sequence[str],
        depth: int = DEPTH,
        staging: int = STAGING,
        min_bytes: int = 0,
        room: Callable[[], int] | None = None,
    ) -> None:
        if staging < depth + 2:
            raise ValueError(f"staging = {staging}: needs at least depth + 2 = {depth + 2} leases")
        for i, d in enumerate(dirs):
            check_dir(d, i)
        super().__init__(device, blocks, depth, min_bytes)
        self.dirs = [run_dir(d, "act-") for d in dirs]
        self.staging = staging
        self.room = room
        self.growth: list[str] = []
        """Each time the leases grew: from how many to how many, and the forward's wait."""
        self._forward: list[float] | None = None  # this forward's [start, seconds waited, puts]
        self._lease_bytes = 0  # the largest staging lease so far
        self._engine = oio.Engine()
        self._files = [_File(oio.open(d / "activations.bin", "x", engine=self._engine)) for d in self.dirs]
        self._puts = 0
        self._leased = 0
        self.clock = DiskClock()
        # The run's files go away with the store, also when close() is never called.
        self._cleanup = weakref.finalize(self, _remove, [f.file for f in self._files], self.dirs, self.clock)

    @property
    def arena_groups(self) -> int:
        return self.staging

    def paths(self) -> list[Path]:
        return [Path(f.file.path) for f in self._files]

    def stored_bytes(self) -> int:
        with self._lock:
            return sum(f.cursor for f in self._files)

    # ---- forward ---------------------------------------------------------------------------------

    def _copy_out(self, st: Stored) -> None:
        assert st.packing is not None
        self._pump()
        if self._forward is None:
            self._forward = [time.perf_counter(), 0.0, 0]
        self._forward[2] += 1
        nbytes = _padded(st.packing.nbytes)
        self._lease_bytes = max(self._lease_bytes, nbytes)
        lease = self._stage(nbytes)
        st.home.lease = lease
        event = self._copy_to_host(st, lease)
        f = self._files[self._puts % len(self._files)]
        self._puts += 1
        if f.live == 0:
            f.cursor = 0
        offset = f.cursor
        f.cursor += nbytes
        f.live += 1
        st.home.region = (f, offset, nbytes)
        clock = self.clock  # not self: a group's handle must not keep the store alive
        spill = _Spill(event, lambda: clock.submitted(f.file.write_from(lease, offset, nbytes), True))
        spill.start()  # at once on the CPU, where the copy is already done
        st.out = spill
        st.home.busy.append(spill)

    def _pump(self) -> None:
        """Submits the writes whose device-to-host copies have landed."""
        for ref in self._live:
            st = ref()
            if st is not None and isinstance(st.out, _Spill):
                st.out.start()

    # ---- backward --------------------------------------------------------------------------------

    def _fetch(self, st: Stored, wait: bool) -> None:
        self._pump()
        if self._forward is not None:
            start, waited, puts = self._forward
            self._grow(start, waited, int(puts), time.perf_counter())
            self._forward = None
        if st.back is not None:  # already on its way to the device
            return
        home = st.home
        if home.lease is None and home.read is None:  # on disk only: read it into a lease
            f, offset, nbytes = home.region
            home.lease = self._stage(nbytes)
            home.read = self.clock.submitted(f.file.read_into(home.lease, offset, nbytes), False)
            home.busy.append(home.read)
        if home.read is not None:
            if not wait and not home.read.done():
                return
            home.read.wait()  # host wait: only bytes that have landed are copied to the device
            after = None
        else:  # still in the lease the forward copied it into
            assert isinstance(st.out, _Spill)
            after = st.out.copy.event
        assert home.lease is not None
        self._copy_to_device(st, home.lease, after)

    # ---- staging leases --------------------------------------------------------------------------

    def _stage(self, nbytes: int) -> Lease:
        """A staging lease for a group of nbytes; when all are out, reclaims one: a retired
        group's, else the oldest group already on its way to disk (host wait for its write).

        Every lease is of the largest group's size (lease_bytes), whatever the group's: then
        any lease's memory holds any group, and the pool maps no more than ``staging`` leases.
        Leased at their own sizes, groups of two sizes (the first block's carries the tables
        that later blocks share, or a size right at the pool's arena) would take arenas of two
        kinds, each group's kind mapped anew while the other's lie free: memory
        :meth:`grow_to` mapped for the larger would sit idle while the smaller mapped more.
        """
        while self._leased >= self.staging:
            self._reap()
            if self._leased < self.staging:
                break
            if self._retired:
                self._settle(self._retired.popleft())
                continue
            victim = self._evictable()
            if victim is None:
                raise RuntimeError(f"all {self.staging} activation staging leases hold groups in use")
            waited = time.perf_counter()
            victim.out.wait()  # host wait: the lease is reused only once its write is done
            if self._forward is not None:
                self._forward[1] += time.perf_counter() - waited
            assert victim.home.lease is not None
            victim.home.busy.remove(victim.out)
            self._release(victim.home.lease)
            victim.home.lease = None
        lease = self._lease(max(nbytes, self._lease_bytes))
        self._leased += 1
        return lease

    def _grow(self, start: float, waited: float, puts: int, end: float) -> None:
        """After a forward of puts groups from start to end that waited waited seconds for the
        disk: leases for the groups it would have needed to run ahead (module docstring)."""
        took = end - start
        if self.room is None or took <= 0 or waited < WAIT_SHARE * took or not self._lease_bytes:
            return
        want = min(self.staging + math.ceil(puts * waited / took / 2), puts)
        fits = self.staging + max(self.room(), 0) // self._lease_bytes
        grown = min(want, fits)
        why = f"the forward waited {waited:.2f} s of {took:.2f} s for the disk"
        self.grow_to(grown, why + ("" if grown == want else f" (the host room fits {grown}, not {want})"))

    @property
    def lease_bytes(self) -> int:
        """The largest staging lease so far (one group, padded); 0 before the first put."""
        return self._lease_bytes

    def grow_to(self, leases: int, why: str) -> None:
        """At least leases staging leases from now on; growth records it with why. Their memory
        is mapped and pinned now (leased once and given back to the pool, which keeps it), so
        that the passes after pay nothing for it: pinning a GiB takes a good part of a second,
        and a pass timed against another must not carry it."""
        asked = time.perf_counter()
        with self._lock:
            if leases <= self.staging:
                return
            start = time.perf_counter()
            before = dict(self.pool.mapping_s) if self.pool is not None else {}
            got: list[Lease] = []
            if self._lease_bytes:
                try:
                    while self._leased + len(got) < leases:
                        got.append(self._lease(self._lease_bytes))
                except PoolExhausted:
                    leases = max(self._leased + len(got), self.staging)
                    why += f" (host memory held {leases})"
                finally:
                    for lease in got:
                        lease.release()
            if leases <= self.staging:
                return
            took = time.perf_counter() - start
            mapping = {} if self.pool is None else self.pool.mapping_s
            parts = {k: v - before.get(k, 0.0) for k, v in mapping.items()}
            split = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
            self.growth.append(
                f"staging {self.staging} -> {leases} leases of {self._lease_bytes / 2**30:.2f} GiB: {why}; "
                f"mapped in {took:.1f} s ({split}; {start - asked:.1f} s waiting for the store)"
            )
            self.staging = leases

    def _evictable(self) -> Stored | None:
        for ref in self._live:
            st = ref()
            if st is not None and st.home.lease is not None and st.home.read is None and st.back is None:
                return st
        return None

    def _make_pool(self, nbytes: int) -> PinnedPool:
        pool = super()._make_pool(nbytes)
        pool.attach_io(self._engine)  # registered buffers where io_uring takes them
        return pool

    def _release(self, lease: Lease) -> None:
        lease.release()
        self._leased -= 1

    def _free(self, home: Home) -> None:
        if home.lease is not None and not self._pool_closed():
            self._release(home.lease)
            home.lease = None
        super()._free(home)
        if home.region is not None:
            home.region[0].live -= 1
            home.region = None

    def _close_tier(self) -> None:
        if self.pool is not None:
            self.pool.detach_io(self._engine)
        self._cleanup()
        self._engine.close()


def _remove(files: list[oio.DirectFile], dirs: list[Path], clock: DiskClock) -> None:
    clock.stop()
    for f in files:
        if not f.closed:
            f.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
