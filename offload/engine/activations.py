"""Where block-boundary states wait for the backward pass: the device, host memory, or NVMe.

Each streamed block keeps its inputs (the boundary hidden state, plus whatever else the model's
loop passes it) until its recompute in backward. ``placement.activations`` picks the tier, and the
tier is a type with one small interface, :class:`ActivationStore`:

- ``put(index, tensors) -> Stored``: in forward, before block ``index`` computes. A handle.
- ``get(stored) -> tensors``: in backward; the compute stream is ordered after the copy back, and
  the next blocks' states (last put, first needed) start coming back ``depth`` ahead.
- ``prefetch(stored)``: start bringing one back now.

:class:`DeviceStore` keeps the tensors where they are (what the engine did before there were
tiers). :class:`HostStore` copies each group out to a pinned pool lease on a side stream while the
block computes, and back on another side stream during backward (SSDTrain's offload, for the
boundary states): the device holds a window of a few blocks' states, so sequence length is bounded
by host memory rather than by the device. NVMe goes one step further (``activations_nvme.py``).

Two rules keep the copies down. A tensor that the previous block was also given (the rotary
tables, an attention mask: one object passed to every block) stays on the device by reference.
And the last group put is still on the device when backward starts with it, so it is handed back
without a round trip. On the CPU every "copy" is a plain memory copy and every event None, so the
tests run the same code.

Host-to-device copies run in the order they become ready, whatever their streams: one copy engine
takes them first come, first served, and a large copy split in parts still holds back a small one
queued after all its parts (``scripts/probe_h2d_streams.py``: a 400 MB copy queued after 3 GB
lands at 65 ms on the H100 instead of 7.8 ms). So a whole kept graph (3 GB at 16K tokens on the
6.7B shape) fetched at once delays the next block's weight upload by its whole transfer, and the
next block's backward waits. A *paced* :class:`HostStore` (the kept graphs' and attention outputs'
stores) instead brings a group back in parts, one per backward block between now and the block
that needs it (``pace(index)``, called once a block's backward and the next weight upload are
queued), so each part comes behind the upload the next block waits for. Its device buffer is
still taken when the group before is got, so the first part waits for the compute queued by
then, not for the block queued since.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from offload.config import ConfigError, Tier
from offload.engine.device import Device
from offload.engine.packing import Packing, storage_key
from offload.memory import PinnedPool
from offload.memory.arena import Lease

DEPTH = 2
"""Groups brought back ahead of the one backward needs now: one computes, two are in flight."""

PACE_MIN_BYTES = 64 << 20
"""The smallest part a paced store brings back at a time (fewer, larger copies below it)."""


class Waitable(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> Any: ...


class CudaWait:
    """A CUDA event (None on the CPU: already done) as a handle with done() and wait()."""

    __slots__ = ("event",)

    def __init__(self, event: Any) -> None:
        self.event = event

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


@dataclass(slots=True, eq=False)
class Home:
    """The host (or disk) side of one group: freed once nothing moves into or out of it."""

    lease: Lease | None = None
    busy: list[Waitable] = field(default_factory=list)
    """Transfers reading or writing the lease."""
    region: Any = None
    """Where the group lies on disk (NVMe)."""
    read: Any = None
    """The read bringing it back from disk into the lease (NVMe)."""
    incoming: torch.Tensor | None = None
    """The device buffer a copy back is writing, until compute has been ordered after that copy
    (OffloadingStore._rebuild). It belongs to the compute stream, which may reuse its memory as
    soon as it is freed: a group dropped while its copy back is in flight (a backward that
    failed) keeps the buffer here, in its retired home, until the copy is done."""


@dataclass(slots=True, eq=False, weakref_slot=True)
class Stored:
    """The handle of one put: a block's boundary tensors, wherever they are now."""

    index: int
    count: int
    kept: dict[int, torch.Tensor]
    """Positions kept on the device by reference (shared with another block, not on the compute
    device, or the device tier)."""
    packing: Packing | None = None
    """Layout of the moved tensors (in position order, the positions not kept)."""
    home: Home = field(default_factory=Home)
    out: Waitable = field(default_factory=lambda: CudaWait(None))
    """The copy out (to host memory, then to disk for NVMe)."""
    buf: torch.Tensor | None = None
    """The moved bytes back on the device, once fetched."""
    back: Any = None
    """Event: the copy back into buf has landed (the latest part queued, when it comes in parts)."""
    sent: int = 0
    """Bytes of the copy back queued so far (a paced store queues it in parts)."""
    claimed: Any = None
    """Event: the compute queued when buf was allocated (the copy back waits for it)."""
    versions: list[int] = field(default_factory=list)
    """Device tier: the tensors' version counters when put."""
    finalizer: Any = None

    def done(self) -> bool:
        """Whether the copy out has finished (the tensors' device memory may be reused)."""
        return self.out.done()

    def wait(self) -> None:
        """Host wait for the copy out; raises its error (a failed NVMe write)."""
        self.out.wait()


class ActivationStore(Protocol):
    """One tier of boundary states; see the module docstring."""

    def put(self, index: int, tensors: Sequence[torch.Tensor]) -> Stored: ...

    def get(self, stored: Stored) -> list[torch.Tensor]: ...

    def prefetch(self, stored: Stored) -> None: ...

    def close(self) -> None: ...

    def stored_bytes(self) -> int: ...


class DeviceStore:
    """Boundary states stay on the device, as saved tensors did."""

    def put(self, index: int, tensors: Sequence[torch.Tensor]) -> Stored:
        return Stored(index, len(tensors), dict(enumerate(tensors)), versions=[t._version for t in tensors])

    def get(self, stored: Stored) -> list[torch.Tensor]:
        tensors = [stored.kept[i] for i in range(stored.count)]
        for i, (t, v) in enumerate(zip(tensors, stored.versions)):
            if t._version != v:
                raise RuntimeError(
                    f"input {i} of block {stored.index} was modified in place after the block ran "
                    f"(version {v} then, {t._version} now): the recompute would see other values"
                )
        return tensors

    def prefetch(self, stored: Stored) -> None:
        return None

    def close(self) -> None:
        return None

    def stored_bytes(self) -> int:
        return 0


class OffloadingStore:
    """What the host and NVMe tiers share: the order of groups, the window ahead, leases.

    Subclasses move the bytes: ``_copy_out(stored)`` (forward) and ``_fetch(stored, wait)``
    (backward; with wait False it only advances what can start without a host wait).
    """

    purpose = "activations"

    def __init__(
        self,
        device: Device,
        blocks: int,
        depth: int = DEPTH,
        min_bytes: int = 0,
        outstanding: int | None = None,
    ) -> None:
        self.device = device
        self.blocks = max(blocks, 1)
        self.depth = depth
        self.min_bytes = min_bytes
        # Copies out that may be in flight when a put queues another (None: any number). The
        # moved tensors' device memory is free only once their copy has read them, so a bound
        # here bounds the device memory of groups waiting for their copy.
        self.outstanding = outstanding
        self._outgoing: collections.deque[Waitable] = collections.deque()
        cuda = device.cuda
        # Own side streams: a copy queued behind a weight upload that waits for a slot would wait
        # for compute too.
        self.d2h: Any = torch.cuda.Stream(device.torch) if cuda else None
        self.h2d: Any = torch.cuda.Stream(device.torch) if cuda else None
        self.pool: PinnedPool | None = None
        self._lock = threading.RLock()
        self._live: list[weakref.ref[Stored]] = []  # put, not yet got, in put order
        self._last: tuple[Stored, list[torch.Tensor]] | None = None  # the latest put, as given
        self._retired: collections.deque[Home] = collections.deque()  # appended by finalizers too
        self._closed = False

    # ---- the interface ---------------------------------------------------------------------------

    def put(self, index: int, tensors: Sequence[torch.Tensor]) -> Stored:
        with self._lock:
            self._check_open()
            self._reap()
            tensors = list(tensors)
            shared = self._shared(tensors)
            # Let the previous group go before this one's copy is queued: a moved tensor's memory
            # is reusable once the d2h stream has passed the event the allocator records when
            # it is freed (record_stream, _copy_to_host), and freed after this copy is queued
            # it would wait for this copy too, one group more on the device.
            self._last = None
            kept = {i: t for i, t in enumerate(tensors) if i in shared or not self._moves(t)}
            st = Stored(index, len(tensors), kept)
            moved = [t for i, t in enumerate(tensors) if i not in kept]
            if moved:
                st.packing = Packing(moved)
                self._bound_outgoing()
                self._copy_out(st)
                st.packing.forget_sources()
                self._outgoing.append(st.out)
            st.finalizer = weakref.finalize(st, self._retired.append, st.home)
            self._live.append(weakref.ref(st))
            self._last = (st, tensors)
            return st

    def get(self, stored: Stored) -> list[torch.Tensor]:
        with self._lock:
            self._check_open()
            if not stored.finalizer.alive:
                raise RuntimeError(
                    f"block {stored.index}'s boundary state was already fetched: a second backward "
                    f"(retain_graph=True) is not supported with placement.activations host or nvme"
                )
            if self._last is not None and self._last[0] is stored:
                tensors = self._last[1]  # still on the device: no round trip
                self._last = None
            else:
                tensors = self._rebuild(stored)
            stored.finalizer()  # the home goes back once its transfers are done
            self._live = [r for r in self._live if r() is not None and r() is not stored]
            self._reap()
            self._ahead()
            return tensors

    def prefetch(self, stored: Stored) -> None:
        with self._lock:
            self._check_open()
            if stored.finalizer.alive and stored.packing is not None:
                self._fetch(stored, wait=False)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._last = None
            for ref in self._live:
                st = ref()
                if st is not None:
                    st.finalizer()
            self._live = []
            self._settle_all()
            self._close_tier()
            if self.pool is not None:
                self.pool.close(force=True)

    def stored_bytes(self) -> int:
        """Bytes of boundary state held outside the device now."""
        with self._lock:
            live = [r() for r in self._live]
            return sum(st.packing.nbytes for st in live if st is not None and st.packing is not None)

    # ---- shared machinery ------------------------------------------------------------------------

    def _bound_outgoing(self) -> None:
        """Host wait for the oldest copies out until fewer than ``outstanding`` are in flight.
        The training thread runs ahead of the device; without this wait it would queue the
        forward of many more blocks, each allocating new tensors while the memory of those
        still waiting for their copy cannot be reused."""
        while self._outgoing and self._outgoing[0].done():
            self._outgoing.popleft()
        while self.outstanding is not None and len(self._outgoing) >= self.outstanding:
            self._outgoing.popleft().wait()

    def _moves(self, t: torch.Tensor) -> bool:
        """Whether t goes out: it lives on the compute device and is large enough to matter."""
        return t.device == self.device.torch and t.numel() * t.element_size() >= max(self.min_bytes, 1)

    def _shared(self, tensors: list[torch.Tensor]) -> set[int]:
        """Positions of tensors whose storage the previous put was also given: one object the
        model's loop hands every block (rotary tables, masks), kept once, on the device. Holding
        the previous put's tensors until now makes the comparison safe: no storage seen there can
        have been freed and reused."""
        if self._last is None:
            return set()
        seen = {storage_key(t) for t in self._last[1]}
        return {i for i, t in enumerate(tensors) if storage_key(t) in seen}

    def _rebuild(self, st: Stored) -> list[torch.Tensor]:
        moved: list[torch.Tensor] = []
        if st.packing is not None:
            self._fetch(st, wait=True)
            assert st.buf is not None
            compute = self.device.compute_stream()
            # Compute must not read the group before the copy back has landed.
            self.device.wait(compute, st.back)
            # From here on compute is the buffer's last user, in its own stream's order: freeing
            # it needs no event (it was allocated on compute, _copy_to_device).
            st.home.incoming = None
            moved = st.packing.rebuild(st.buf)
            st.buf = None
        it = iter(moved)
        return [st.kept[i] if i in st.kept else next(it) for i in range(st.count)]

    def _ahead(self) -> None:
        """Starts bringing back the next groups backward will want: the latest put first."""
        for st in self._waiting():
            if st.packing is not None:
                self._fetch(st, wait=False)

    def _waiting(self) -> list[Stored]:
        """The next ``depth`` groups backward will want: put, not yet got, the latest put first."""
        return [st for st in (r() for r in reversed(self._live)) if st is not None][: self.depth]

    def _copy_to_host(self, st: Stored, lease: Lease) -> Any:
        """Queues the copy of st's moved tensors into lease on the d2h stream; returns its event."""
        assert st.packing is not None
        dev = self.device
        ready = dev.event(dev.compute_stream())
        with dev.stream(self.d2h):
            # The copy must not read the tensors before the kernels producing them have run.
            dev.wait(self.d2h, ready)
            st.packing.copy_out(lease.tensor)
            if dev.cuda:
                for src in st.packing.sources:
                    # The allocator must not give their memory to another tensor before this copy
                    # has read it (the block drops them as soon as it has run).
                    src.record_stream(self.d2h)
            return dev.event(self.d2h)

    def _claim(self, st: Stored) -> None:
        """Allocates st's device buffer for the copy back, on the compute stream, where the group
        will be read: it may take the memory of a group whose last use compute has queued (the
        previous block's, freed as its backward returned), so st.claimed marks the compute
        queued so far, which the copy must wait for. Allocated on the h2d stream instead, it
        could only reuse memory whose users had finished on the device by the time the host
        asked, and the host runs blocks ahead of the device in backward (it waits for nothing
        there): each group coming back would take new memory while the ones before it waited to
        be freed, instead of a window of two."""
        assert st.packing is not None
        st.buf = torch.empty(st.packing.nbytes, dtype=torch.uint8, device=self.device.torch)
        st.home.incoming = st.buf
        st.claimed = self.device.event(self.device.compute_stream())

    def _copy_to_device(
        self, st: Stored, lease: Lease, after: Any, upto: int | None = None, began: Any = None
    ) -> None:
        """Queues the copy of lease back into st's device buffer (claimed first if it is not)
        on the h2d stream: its bytes from what was queued before (st.sent) up to upto (None:
        the rest), after the event began (None: at once). The first part waits for the compute
        the buffer's memory may still be read by, and for the copy out (after); the later parts
        follow it on the stream."""
        assert st.packing is not None
        dev = self.device
        end = st.packing.nbytes if upto is None else min(upto, st.packing.nbytes)
        if st.buf is None:
            self._claim(st)
        with dev.stream(self.h2d):
            if st.sent == 0:
                dev.wait(self.h2d, st.claimed)
                # The copy back must not start before the copy out has landed in host memory.
                dev.wait(self.h2d, after)
            dev.wait(self.h2d, began)
            assert st.buf is not None
            st.buf[st.sent : end].copy_(lease.tensor[st.sent : end], non_blocking=True)
            st.back = dev.event(self.h2d)
        st.sent = end
        st.home.busy.append(CudaWait(st.back))  # the lease is free once this copy has read it

    def _lease(self, nbytes: int) -> Lease:
        if self.pool is None:
            self.pool = self._make_pool(nbytes)
        return self.pool.lease(nbytes, purpose=self.purpose)

    def _make_pool(self, nbytes: int) -> PinnedPool:
        """A pool sized from the first group: arenas of ``arena_groups`` groups (at most 1 GiB,
        mapped as needed), capped at the host's memory. Registered with CUDA when the device is."""
        page = 4096
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        arena = min(-(-nbytes * self.arena_groups // page) * page, 1 << 30, total)
        return PinnedPool(total, arena_bytes=arena, pin=self.device.cuda, name=self.purpose)

    @property
    def arena_groups(self) -> int:
        """Groups one arena is sized for: the host tier keeps every block's."""
        return self.blocks

    def _reap(self) -> None:
        """Frees the homes whose transfers are all done."""
        for _ in range(len(self._retired)):
            home = self._retired.popleft()
            if all(w.done() for w in home.busy):
                self._free(home)
            else:
                self._retired.append(home)

    def _settle_all(self) -> None:
        while self._retired:
            self._settle(self._retired.popleft())

    def _settle(self, home: Home) -> None:
        """Host wait for a retired home's transfers, then frees it. Errors are dropped: the data
        they moved is no longer wanted."""
        for w in home.busy:
            with contextlib.suppress(OSError):
                w.wait()
        self._free(home)

    def _free(self, home: Home) -> None:
        home.busy.clear()
        home.incoming = None
        if home.lease is not None and not self._pool_closed():
            home.lease.release()
        home.lease = None

    def _pool_closed(self) -> bool:
        return self.pool is not None and self.pool.closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.purpose} store is closed")

    # ---- what a tier provides --------------------------------------------------------------------

    def _copy_out(self, st: Stored) -> None:
        raise NotImplementedError

    def _fetch(self, st: Stored, wait: bool) -> None:
        raise NotImplementedError

    def _close_tier(self) -> None:
        return None


class HostStore(OffloadingStore):
    """Boundary states (or a block's saved tensors, engine/saved.py) in pinned host memory: one
    lease per group, out during forward, back during backward. paced: the copies back come in
    parts behind the weight uploads (:meth:`pace`) rather than whole when the group before is
    got."""

    def __init__(self, device: Device, blocks: int, *args: Any, paced: bool = False, **kwargs: Any) -> None:
        super().__init__(device, blocks, *args, **kwargs)
        self.paced = paced

    def pace(self, index: int, began: Any = None) -> None:
        """Block index's backward and the next block's weight upload are queued: queues the
        next part of each of the next ``depth`` groups coming back, its remaining bytes spread
        evenly over the backward blocks left before the one that needs it (at least
        PACE_MIN_BYTES a part). began: an event on the compute stream where block index's
        backward began (None: none to wait for), which the part waits for. The upload queued
        before it waits for the same point (its slot is free then), so the two start together
        and the upload, queued first, goes first; without it the host, which runs blocks ahead
        in backward, would have queued every part of a group before the device reached them,
        and they would run back to back ahead of the uploads. A no-op for a store that is not
        paced."""
        if not self.paced:
            return
        with self._lock:
            if self._closed:
                return
            for st in self._waiting():
                if st.packing is None or st.index >= index or st.sent >= st.packing.nbytes:
                    continue
                if st.buf is None and index - st.index > 1:
                    # The first group of a backward (no group before it was got): its buffer is
                    # claimed now, after this block, so a part queued now could only start when
                    # the next one does, beside that block's own part. It starts then instead.
                    self._claim(st)
                    continue
                left = st.packing.nbytes - st.sent
                part = max(-(-left // (index - st.index)), PACE_MIN_BYTES)
                self._fetch(st, wait=False, upto=st.sent + part, began=began)

    def _ahead(self) -> None:
        """Not paced: the next groups start coming back now. Paced: their device buffers are
        claimed now, so the copies queued later by pace() wait only for the compute queued so
        far, not for the block about to be queued."""
        if not self.paced:
            super()._ahead()
            return
        for st in self._waiting():
            if st.packing is not None and st.buf is None:
                self._claim(st)

    def _copy_out(self, st: Stored) -> None:
        assert st.packing is not None
        st.home.lease = self._lease(st.packing.nbytes)
        event = self._copy_to_host(st, st.home.lease)
        st.out = CudaWait(event)
        st.home.busy.append(st.out)

    def _fetch(self, st: Stored, wait: bool, upto: int | None = None, began: Any = None) -> None:
        assert st.packing is not None
        if st.sent < st.packing.nbytes:  # not all on its way back yet
            assert st.home.lease is not None
            out = st.out.event if isinstance(st.out, CudaWait) else None
            self._copy_to_device(st, st.home.lease, out, upto, began)


class KeptStore:
    """The pinned host store of blocks that keep what backward reads (engine/saved.py: whole
    graphs; engine/attention.py: attention outputs), made at the first host-kept block: one copy
    out in flight at a put and one group brought back ahead in backward, as the planner counts
    (offload.plan.recompute.SAVED_WINDOW)."""

    def __init__(self, device: Device, blocks: int, purpose: str, min_bytes: int = 0) -> None:
        self.device, self.blocks, self.purpose, self.min_bytes = device, blocks, purpose, min_bytes
        self.made: HostStore | None = None

    @property
    def store(self) -> HostStore:
        if self.made is None:
            self.made = HostStore(
                self.device, self.blocks, depth=1, min_bytes=self.min_bytes, outstanding=1, paced=True
            )
            self.made.purpose = self.purpose
        return self.made

    def stored_bytes(self) -> int:
        return 0 if self.made is None else self.made.stored_bytes()

    def pace(self, index: int, began: Any = None) -> None:
        if self.made is not None:
            self.made.pace(index, began)

    def close(self) -> None:
        if self.made is not None:
            self.made.close()


class HostKept:
    """For the owners of a ``KeptStore`` in ``_host``: its store, bytes and close."""

    _host: KeptStore

    @property
    def store(self) -> HostStore:
        """The host tier, made at the first host-kept block."""
        return self._host.store

    def stored_bytes(self) -> int:
        return self._host.stored_bytes()

    def pace(self, index: int, began: Any = None) -> None:
        """Block index's backward and the next weight upload are queued (HostStore.pace)."""
        self._host.pace(index, began)

    def close(self) -> None:
        self._host.close()


def make_store(
    tier: Tier,
    device: Device,
    blocks: int,
    nvme_dirs: Sequence[str] = (),
    room: Callable[[], int] | None = None,
) -> ActivationStore:
    """The store for a boundary-state tier (``placement.activations`` as the plan resolved it;
    auto given here keeps them on the device); room the host bytes nvme's staging may still
    grow into (None: it does not grow)."""
    if tier in (Tier.GPU, Tier.AUTO):
        return DeviceStore()
    if tier is Tier.HOST:
        return HostStore(device, blocks)
    if tier is Tier.NVME:
        from offload.engine.activations_nvme import NvmeStore  # it builds on this module

        return NvmeStore(device, blocks, nvme_dirs, room=room)
    raise ConfigError("placement.activations", str(tier), "not built for activations: use gpu, host or nvme")
