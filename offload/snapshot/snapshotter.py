"""Snapshotter: in-memory snapshots of a wrapped run, kept by the node's keeper, with parity on the
keepers of other nodes (after REFT; docs/snapshot.md).

    snap = Snapshotter(model, optimizer, SnapshotConfig(flush_dir="ckpt"))
    restored = snap.restore(scheduler=sched)      # after a crash: the last snapshot (else fresh)
    stream.load_state_dict(restored.extra.get("data", stream.state_dict()))
    for step in range((restored.step or 0) + 1, steps + 1):
        ...; optimizer.step(); sched.step(); optimizer.zero_grad()
        snap.maybe_snapshot(step, scheduler=sched, extra={"data": stream.state_dict()})

Multi-rank, every rank makes its Snapshotter (a collective), takes each snapshot at the same step
and restores together. ``snapshot()`` sets the snapshot up and returns; with ``lazy`` the host
records are copied into the keeper's segment in the background, each before its next update
(capture fences, as checkpoints do), and the parity exchange follows on the same thread. Device
records are copied inside the call. One snapshot at a time: the next call waits for the one before.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from offload.checkpoint import state
from offload.checkpoint.capture import CaptureFence
from offload.checkpoint.writer import drain
from offload.snapshot import flush, parity, payload, segment
from offload.snapshot.client import KeeperClient, Segment
from offload.snapshot.config import SnapshotConfig, SnapshotHandle, interval
from offload.snapshot.job import SnapshotJob
from offload.snapshot.keeper import KeeperError
from offload.snapshot.segment import Header
from offload.snapshot.topology import node_keys_to_topology


class Snapshotter:
    def __init__(
        self, model: Any, optimizer: Any, config: SnapshotConfig | None = None, **overrides: Any
    ) -> None:
        cfg = config if config is not None else SnapshotConfig()
        self.cfg = replace(cfg, **overrides) if overrides else cfg
        self.rt = state.runtime_of(model, optimizer)
        self.model, self.optimizer = model, optimizer
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if multi else 0
        self.world = dist.get_world_size() if multi else 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        where = None if self.cfg.dir is None else self.cfg.dir.format(rank=self.rank, local_rank=local)
        try:
            self.client = KeeperClient.connect(where, idle_timeout=self.cfg.idle_timeout_s)
            failure: Exception | None = None
        except Exception as e:
            if not multi:
                raise
            failure = e  # told to the other ranks below, so that none waits for this one
        # Its own group: a snapshot's collectives run on a background thread, and must never
        # interleave with the training's on the default group.
        self.pg = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.timeout_s)) if multi else None
        )
        # Each rank's node key (its host and keeper directory), or why it has no keeper.
        mine: Any = (
            f"{socket.gethostname()}:{os.path.realpath(self.client.dir)}"
            if failure is None
            else {"failed": f"{type(failure).__name__}: {failure}"}
        )
        keys = [mine] if self.pg is None else parity.gather_json(self.pg, mine)
        failed = {r: k["failed"] for r, k in enumerate(keys) if isinstance(k, dict)}
        if failure is not None:
            raise failure
        if failed:
            self.client.close()
            raise KeeperError(
                "offload snapshot: "
                + "; ".join(f"rank {r} could not connect to its keeper: {why}" for r, why in failed.items())
            )
        self.topo = node_keys_to_topology(keys, self.rank, self.cfg.parity)
        self.segments: dict[int, Segment] = {}
        self.current: SnapshotHandle | None = None
        self._reported: SnapshotHandle | None = None  # the last failed snapshot already printed
        self._next: int | None = None  # the step auto takes its next snapshot at
        self._last_call: tuple[int, float] | None = None
        self._step_s = 0.0
        # Run before the optimizer worker's (registered earlier): it may hold an update for us.
        atexit.register(_wait_at_exit, weakref.ref(self))

    # ---- taking snapshots ----------------------------------------------------------------------

    def maybe_snapshot(self, step: int, *, scheduler: Any = None, extra: Any = None) -> SnapshotHandle | None:
        """Takes a snapshot if ``every`` says step is due (call it after every optimizer step)."""
        now = time.monotonic()
        if self._last_call is not None and step > self._last_call[0]:
            self._step_s = (now - self._last_call[1]) / (step - self._last_call[0])
        self._last_call = (step, now)
        every = self.cfg.every
        due = step % every == 0 if isinstance(every, int) else self._next is None or step >= self._next
        return self.snapshot(step, scheduler=scheduler, extra=extra) if due else None

    def snapshot(self, step: int, *, scheduler: Any = None, extra: Any = None) -> SnapshotHandle:
        """Starts a snapshot of the state as of this call (after optimizer.step()); returns at once
        with lazy, else once it is committed. extra: plain JSON data (the data position)."""
        t0 = time.perf_counter()
        self.wait_idle()  # one at a time: the segments and the process group are shared
        proposal = self._proposed_interval()
        rt = self.rt
        rt.check_update()  # an update that already failed: the records do not hold a step
        drain(rt)  # a checkpoint save in flight has the optimizer's only fence slot
        extra = _plain(extra if extra is not None else {})
        idx = payload.index(
            rt,
            self.optimizer,
            job=self.cfg.job,
            step=step,
            rank=self.rank,
            world=self.world,
            scheduler=scheduler,
            extra=extra,
        )
        raw = payload.encode_index(idx)
        need, every = self._agree(payload.payload_bytes(raw, rt), proposal)
        self._next = step + every
        topo = self.topo
        chunk = segment.chunk_bytes(need, topo.k)
        seg = self.segment_for(chunk)
        header = self.blank(chunk)
        seg.write_header(header)  # nothing is committed in this slot while it is rewritten
        whole = torch.frombuffer(seg.mm, dtype=torch.uint8)
        data_end = segment.HEADER_BYTES + topo.k * chunk
        data, cells = whole[segment.HEADER_BYTES : data_end], whole[data_end:]
        data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        base = -(-len(raw) // payload.BASE_ALIGN) * payload.BASE_ALIGN
        records = list(zip(rt.records(), payload.spans(rt)))
        for rec, span in records:
            if rec.on_device:  # updated by kernels inside step(): no fence reaches them, copy now
                payload.capture(rt, rec, payload.views(data, base, span))
        host = _update_order(
            [(r, s) for r, s in records if not r.on_device], rt.cfg.optimizer.overlap_backward
        )
        fence = None
        if self.cfg.lazy:
            fence = CaptureFence([r for r, _ in host], rt.tracer)
            fence.install(rt, [r for r, _ in host])
        else:
            rt.wait_updates()  # host wait: every update queued before the snapshot has run
        handle = SnapshotHandle(step)
        job = SnapshotJob(
            rt=rt,
            handle=handle,
            seg=seg,
            header=header,
            data=data,
            cells=cells,
            base=base,
            host=host,
            fence=fence,
            topo=topo,
            pg=self.pg,
            piece=self.cfg.piece_bytes,
            nbytes=need,
            t0=t0,
        )
        job.call_s = time.perf_counter() - t0
        self.current = handle
        if fence is None:
            job.run()
        else:
            threading.Thread(target=job.run, name="offload-snapshot", daemon=True).start()
        return handle

    def wait(self) -> None:
        """Waits for the snapshot in flight, raising its error."""
        if self.current is not None:
            self.current.wait()

    def wait_idle(self) -> None:
        """Waits for the snapshot in flight. Its error stays with its handle and is printed once:
        training goes on, and the keeper still holds the last snapshot that committed."""
        last = self.current
        if last is None:
            return
        try:
            last.wait()
        except BaseException as e:
            if last is not self._reported:
                self._reported = last
                print(
                    f"offload snapshot: the snapshot of step {last.step} failed: {e}",
                    file=sys.stderr,
                    flush=True,
                )

    def _proposed_interval(self) -> int:
        """Steps until the next snapshot by this rank's measurements (auto), or 1."""
        last = self.current
        if self.cfg.every != "auto" or last is None or not last.done():
            return 1
        return interval(last.stats.stall_s, self._step_s, self.cfg.budget)

    def _agree(self, need: int, every: int) -> tuple[int, int]:
        """The largest payload and interval over the ranks: one chunk size and schedule for all."""
        if self.pg is None:
            return need, every
        t = torch.tensor([need, every], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return int(t[0]), int(t[1])

    def blank(self, chunk: int) -> Header:
        """This rank's header with nothing committed, for chunks of L = chunk bytes."""
        t = self.topo
        return Header(
            job=self.cfg.job, rank=self.rank, world=self.world, group=t.group, node=t.node, m=t.m, chunk=chunk
        )

    def segment_for(self, chunk: int) -> Segment:
        """The slot to write next (empty, else the oldest committed), mapped at the right size."""
        steps = []
        for slot in range(self.cfg.buffers):
            h = self.header(slot)
            steps.append((h.step if h is not None else -1, slot))
        _, slot = min(steps)
        nbytes = segment.segment_bytes(self.topo.k, self.topo.m, chunk)
        seg = self.segments.get(slot)
        if seg is None or seg.nbytes != nbytes:
            if seg is not None:
                seg.close()
            seg = self.segments[slot] = self.client.segment(self.cfg.job, self.rank, slot, nbytes)
        return seg

    # ---- reading back --------------------------------------------------------------------------

    def open(self, slot: int) -> Segment | None:
        """This rank's segment in slot (mapped on first use), or None if the keeper has none."""
        seg = self.segments.get(slot)
        if seg is None:
            seg = self.client.open(self.cfg.job, self.rank, slot)
            if seg is not None:
                self.segments[slot] = seg
        return seg

    def header(self, slot: int, *, ask: bool = True) -> Header | None:
        """The header of this rank's segment in slot when it belongs to this job, else None.
        ask=False: only from a segment already mapped (no request to the keeper)."""
        seg = self.open(slot) if ask else self.segments.get(slot)
        h = None if seg is None else seg.header()
        return h if h is not None and h.job == self.cfg.job else None

    def restore(self, *, scheduler: Any = None) -> Any:
        """Restores the newest snapshot the group can put together (recovery.py); a collective.
        When it fails on one rank, every rank raises at once, the others naming it."""
        from offload.snapshot.recovery import restore

        self.wait_idle()
        return restore(self, scheduler)

    # ---- to disk -------------------------------------------------------------------------------

    def flush(self, root: str | os.PathLike[str] | None = None, *, wait: bool = True) -> Path:
        """Writes this rank's newest committed snapshot to root (default: flush_dir) as
        ``snap_<step>/rank_<r>.snap``; with wait, the snapshot in flight first. wait=False (the
        SIGTERM handler) neither waits nor asks the keeper anything: the signal may have come in
        the middle of a request on this thread, and the connection is not reentrant."""
        where = root if root is not None else self.cfg.flush_dir
        if where is None:
            raise ValueError("flush() needs a directory: pass root= or set SnapshotConfig.flush_dir")
        if wait:
            self.wait_idle()
        best = max(
            (
                (h.step, slot)
                for slot in range(self.cfg.buffers)
                if (h := self.header(slot, ask=wait)) is not None
            ),
            default=(-1, -1),
        )
        if best[0] < 0:
            raise flush.FlushError(
                f"rank {self.rank} holds no committed snapshot of job '{self.cfg.job}' to flush"
            )
        seg = self.segments[best[1]]
        h = seg.header()
        if h is None or h.step != best[0]:
            raise flush.FlushError(
                f"the snapshot of step {best[0]} changed while it was flushed: flush again"
            )
        return flush.write(seg.mm, h, Path(where))

    def install_sigterm(self) -> Callable[[], None]:
        """On SIGTERM (a preemption), flush the newest committed snapshot to flush_dir, then let the
        signal do what it did before (by default: end the process). Call from the main thread.
        Returns the function that puts the previous handler back (if this one is still installed)."""
        if self.cfg.flush_dir is None:
            raise ValueError("install_sigterm() needs SnapshotConfig.flush_dir: where the snapshot goes")
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            try:  # not waiting for a snapshot in flight: its peers may be gone already
                path = self.flush(wait=False)
                print(f"offload snapshot: SIGTERM: flushed to {path}", file=sys.stderr, flush=True)
            except Exception as e:
                print(f"offload snapshot: SIGTERM: nothing flushed: {e}", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)

        def uninstall() -> None:
            if signal.getsignal(signal.SIGTERM) is on_sigterm:
                signal.signal(signal.SIGTERM, previous)

        return uninstall

    def close(self) -> None:
        self.wait_idle()
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        self.client.close()


def _wait_at_exit(ref: weakref.ref[Snapshotter]) -> None:
    snap = ref()
    if snap is not None:
        snap.wait_idle()


def _update_order(items: list[tuple[Any, Any]], overlap: bool) -> list[tuple[Any, Any]]:
    """Host records in the order their next updates run (as offload.checkpoint.job.write_order)."""
    if overlap:
        return sorted(items, key=lambda it: (it[0].index < 0, -it[0].index))
    return sorted(items, key=lambda it: it[0].index)


def _plain(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be plain JSON data (dicts, lists, str, numbers): {e}") from None
