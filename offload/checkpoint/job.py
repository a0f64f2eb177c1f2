"""The writer thread of an asynchronous save: streams each record's file, then commits.

Records are written in the order given (save() puts the host records first, in the order their
next updates need them, then the device records' snapshots). A host record is read as soon as the
capture fence says it holds the saved step (``wait_ready``), through its StateTier for Adam's m
and v (NVMe-resident state is read back from its file), and released to the optimizer
(``captured``) once its bytes are in the staging ring. After the last record: every write waited
for, each file fsynced, then the commit (manifest, rename, ``latest``, retention; see writer.py).
With ``prune="before"`` the steps the commit makes surplus are taken out first and their files
written over in place (recycle.py). A failure releases the fence, lets the writes in flight
finish and removes the directory (and what it took out to recycle).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from offload import io as oio
from offload.checkpoint import state
from offload.checkpoint.capture import CaptureFence, Snapshot
from offload.checkpoint.format import (
    KINDS,
    LATEST,
    MANIFEST,
    CheckpointError,
    fsync_dir,
    record_filename,
    tensor_key,
)
from offload.checkpoint.handle import SaveHandle, SaveStats
from offload.checkpoint.recycle import Recycler
from offload.checkpoint.retention import Retention, doomed, prune
from offload.checkpoint.staging import FileStream, Staging, Tally, safetensors_header
from offload.engine.runtime import Runtime
from offload.store.record import BlockRecord


@dataclass(slots=True)
class RecordPlan:
    """One record's file: its parameters, header and size."""

    rec: BlockRecord
    refs: list[state.ParamRef]
    file: str
    header: bytes
    index: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(e["nbytes"] for e in self.index.values())


def write_order(plans: list[RecordPlan], overlap: bool) -> list[RecordPlan]:
    """Host records in the order their next updates run: during backward (overlap_backward), the
    last block first and the residents after it; at step(), the residents, then block 0, 1, ..."""
    if overlap:
        return sorted(plans, key=lambda p: (p.rec.index < 0, -p.rec.index))
    return sorted(plans, key=lambda p: p.rec.index)


def plan_record(rec: BlockRecord, refs: list[state.ParamRef]) -> RecordPlan:
    items = [
        (tensor_key(kind, ref.names[0]), torch.float32, ref.slot.shape) for ref in refs for kind in KINDS
    ]
    header, index = safetensors_header(items)
    return RecordPlan(rec, refs, record_filename(rec.name), header, index)


@dataclass(slots=True, kw_only=True)
class SaveJob:
    """The writer thread's work for one save."""

    rt: Runtime
    handle: SaveHandle
    tmp: Path
    retention: Retention | None
    staging_for: Callable[[], Staging]  # the runtime's ring, made (or remade) on first use
    staging: Staging | None = None  # made by run(): mapping and pinning a new ring takes seconds
    direct: bool  # O_DIRECT works under the root
    plans: list[RecordPlan]  # in the order they are written
    fence: CaptureFence
    snaps: dict[int, Snapshot]  # device records' copies, by id of the record
    device_copy: str
    manifest: dict[str, Any]  # all but params and tensors
    stream: Any = None  # the writer's CUDA stream
    files: list[oio.DirectFile] = field(default_factory=list)
    current: FileStream | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    staged: list[tuple[RecordPlan, FileStream]] = field(default_factory=list)  # crc32s pending
    bytes: int = 0
    t0: float = 0.0
    call_s: float = 0.0
    waited_s: float = 0.0
    group: Any = None  # multi-rank: the Collective (its side channel carries the shards to rank 0)
    failed: BaseException | None = None  # the first write error (rank 0 of a multi-rank save)
    recycle: bool = False  # prune="before": write over the files of the steps this save makes surplus
    recycler: Recycler | None = None
    reused: int = 0  # bytes written over a surplus step's files
    prune_s: float = 0.0
    commit_s: float = 0.0
    ring_s: float = 0.0

    def run(self) -> None:
        start = time.perf_counter()
        tally = Tally()
        try:
            if self.group is None:
                tally = self._prepare()
            elif self.group.rank == 0:  # the other ranks only hand over their shards: no ring
                self._guarded(self._prepare)
            for plan in self._order():
                with self.rt.tracer.span("checkpoint", "io", block=plan.rec.index):
                    if self.group is None:
                        self._write(plan)
                    else:
                        self._write_ranked(plan)
            self.fence.release(self.rt)
            if self.group is None or self.group.rank == 0:
                self._guarded(self._finish)
            if self.group is not None and not self.group.agree(self.failed is None):
                # every rank learns the outcome from rank 0, and only after its commit
                raise self.failed or RuntimeError("rank 0 could not write the checkpoint")
            if self.failed is not None:
                raise self.failed
        except BaseException as e:
            self.handle._error = e
            self._abandon()
        finally:
            self.fence.release(self.rt)
            self.snaps.clear()
            self.handle._stats = self._stats(start, tally)
            self.handle._done.set()

    def _stats(self, start: float, tally: Tally) -> SaveStats:
        end = time.perf_counter()
        spent = self.staging.tally.since(tally) if self.staging is not None else Tally()
        return SaveStats(
            step=self.handle.step,
            bytes=self.bytes,
            seconds=end - self.t0,
            write_s=end - start - self.ring_s,
            call_s=self.call_s,
            waited_s=self.waited_s,
            hold_s=self.fence.hold_s,
            device_copy=self.device_copy,
            reused_bytes=self.reused,
            prune_s=self.prune_s,
            commit_s=self.commit_s,
            ring_s=self.ring_s,
            capture_s=0.0 if self.fence.captured_at is None else self.fence.captured_at - self.t0,
            ready_wait_s=self.fence.ready_wait_s,
            copy_s=spent.copy_s,
            write_wait_s=spent.write_wait_s,
            crc_wait_s=spent.crc_wait_s,
        )

    def _order(self) -> Iterator[RecordPlan]:
        """The plans in the order they are written. One process: each host record when the capture
        fence says it is the one to take (the worker waits for it, or it is the first ready, see
        CaptureFence.next_ready); while none is ready (the updates queued before save() still
        run), a device snapshot, so the disk does not wait with them; then the other snapshots.
        Multi-rank: as given, the same on every rank (the shards travel in collectives)."""
        if self.group is not None:
            yield from self.plans
            return
        host = [p for p in self.plans if id(p.rec) not in self.snaps]
        device = [p for p in self.plans if id(p.rec) in self.snaps]
        while host:
            rec = self.fence.next_ready([p.rec for p in host], wait=not device)
            if rec is None:
                yield device.pop(0)
                continue
            plan = next(p for p in host if p.rec is rec)
            host.remove(plan)
            yield plan
        yield from device

    def _write(self, plan: RecordPlan) -> None:
        rec = plan.rec
        fs = self._open(plan)
        snap = self.snaps.pop(id(rec), None)
        if snap is None:
            self.fence.wait_ready(rec)
            with state.optimizer_state(self.rt, rec) as held:
                step = int(rec.step.item())
                self._put(fs, plan, *held)
                fs.finish()
            self.fence.captured(rec)
        else:
            if snap.ready is not None:
                # The writer's stream reads the snapshot only after the compute stream made it. The
                # snapshot is freed below, after this stream's copies were waited for in finish().
                self.stream.wait_event(snap.ready)
            with self.rt.device.stream(self.stream):
                step = int(snap.step.to("cpu").item())
            self._put(fs, plan, snap.master, snap.exp_avg, snap.exp_avg_sq)
            fs.finish()
        self._index(plan, fs, step)

    def _prepare(self) -> Tally:
        """On the writer thread, not in save(): the staging ring (made on a runtime's first save,
        or when its size changes) and, with prune="before", the steps to write over. Returns the
        ring's tally so far."""
        t = time.perf_counter()
        self.staging = self.staging_for()
        self.ring_s = time.perf_counter() - t
        tally = replace(self.staging.tally)
        self._recycle()
        return tally

    @property
    def ring(self) -> Staging:
        assert self.staging is not None, "the staging ring is made in run() before any record is written"
        return self.staging

    def _recycle(self) -> None:
        """prune="before": takes the steps this save makes surplus out of the listing and keeps
        their files to write over (recycle.py)."""
        if not self.recycle or self.retention is None:
            return
        t = time.perf_counter()
        root = self.handle.path.parent
        with self.rt.tracer.span("recycle", "io", step=self.handle.step):
            surplus = doomed(root, self.retention, upcoming=self.handle.path.name)
            self.recycler = Recycler.take(root, surplus, {p.file for p in self.plans})
        self.prune_s += time.perf_counter() - t

    def _open(self, plan: RecordPlan) -> FileStream:
        path = self.tmp / plan.file
        reused = self.recycler is not None and self.recycler.claim(plan.file, path)
        f = oio.open(path, "r+" if reused else "x", direct=self.direct, engine=self.ring.engine)
        self.files.append(f)
        if reused:  # its blocks are allocated and written: overwriting them needs no new extents
            old = f.size()
            self.reused += min(old, plan.nbytes)
            if old > plan.nbytes:
                f.truncate(plan.nbytes)
        f.allocate(plan.nbytes)  # a full disk fails here, before any byte of the file moves
        fs = self.current = FileStream(self.ring, f, self.stream)
        fs.put(None, torch.frombuffer(bytearray(plan.header), dtype=torch.uint8))
        return fs

    def _index(self, plan: RecordPlan, fs: FileStream, step: int) -> None:
        """The record's file is staged: its parameters go into the manifest, its tensors once their
        crc32 sums are done (at the commit: the writer does not wait for them between files)."""
        self.current = None
        self.bytes += fs.bytes
        for ref in plan.refs:
            name = ref.names[0]
            self.params[name] = {"aliases": list(ref.names[1:]), "shape": list(ref.slot.shape), "step": step}
        self.staged.append((plan, fs))

    def _checksums(self) -> None:
        """Every staged file's tensors, with their crc32s, into the manifest (after drain(): the
        sums are done)."""
        for plan, fs in self.staged:
            crcs = fs.crcs()
            for key, entry in plan.index.items():
                self.tensors[key] = {"file": plan.file, **entry, "crc32": crcs[key]}
        self.staged.clear()

    # ---- multi-rank: rank 0 writes the whole blocks the ranks' shards make ----------------------

    def _write_ranked(self, plan: RecordPlan) -> None:
        """A record of a multi-rank run. A sharded one: every rank hands its captured shard to rank
        0 over the side channel (a collective, so every rank goes through every sharded record in
        the same order, even after rank 0 failed to write one) and releases it; rank 0 writes the
        whole block, the same file a single-rank save writes. A replicated one: rank 0 alone."""
        assert self.group is not None
        rec, root = plan.rec, self.group.rank == 0
        if rec.shard is None:
            if root:
                self._guarded(lambda: self._write(plan))
            return
        self.fence.wait_ready(rec)
        with state.optimizer_state(self.rt, rec) as held:
            step = int(rec.step.item())
            wholes = [self.group.gather_to_root(t) for t in held]
        self.fence.captured(rec)  # the gathered copies are the save's: the next update may run
        if root:
            self._guarded(lambda: self._write_whole(plan, step, [w for w in wholes if w is not None]))

    def _write_whole(self, plan: RecordPlan, step: int, wholes: list[torch.Tensor]) -> None:
        fs = self._open(plan)
        self._put(fs, plan, *wholes)
        fs.finish()
        self._index(plan, fs, step)

    def _guarded(self, write: Any) -> None:
        """Rank 0 keeps the first write error and writes nothing more, but stays in the collectives."""
        if self.failed is not None:
            return
        try:
            write()
        except Exception as e:
            self.failed = e

    @staticmethod
    def _put(fs: FileStream, plan: RecordPlan, *flats: torch.Tensor) -> None:
        """Each parameter's master, exp_avg and exp_avg_sq, from the record's flat buffers."""
        for ref in plan.refs:
            for kind, flat in zip(KINDS, flats):
                fs.put(tensor_key(kind, ref.names[0]), ref.view(flat).reshape(-1).view(torch.uint8))

    def _finish(self) -> None:
        t = time.perf_counter()
        try:
            with self.rt.tracer.span("commit", "io", step=self.handle.step):
                self.ring.drain()  # every chunk's write and crc32 sum is done (or raises its error)
                self._checksums()
                for f in self.files:
                    f.sync()
                    f.close()
                self._commit()
        finally:
            self.commit_s = time.perf_counter() - t

    def _commit(self) -> None:
        tmp, final = self.tmp, self.handle.path
        root = final.parent
        manifest = {**self.manifest, "params": self.params, "tensors": self.tensors}
        raw = json.dumps(manifest, indent=1).encode()
        write_file(tmp / MANIFEST, raw)
        self.bytes += len(raw)
        fsync_dir(tmp)
        os.rename(tmp, final)  # the commit
        fsync_dir(root)
        write_file(root / LATEST, f"{final.name}\n".encode(), atomic=True)
        fsync_dir(root)
        if self.retention is not None:
            self._prune(root, final)  # after latest moved: the old one may go too

    def _prune(self, root: Path, final: Path) -> None:
        """Retention, once this step is committed: what is left of the recycled steps, then every
        step the rule drops. A failure here does not undo the commit; wait() raises it, saying so."""
        assert self.retention is not None
        t = time.perf_counter()
        try:
            with self.rt.tracer.span("prune", "io", step=self.handle.step):
                if self.recycler is not None:
                    self.recycler.close()
                    self.recycler = None
                prune(root, self.retention, protect=[final])
                fsync_dir(root)
        except OSError as e:
            raise CheckpointError(f"{final} is committed, but pruning older steps failed: {e}") from e
        finally:
            self.prune_s += time.perf_counter() - t

    def abandon(self) -> None:
        """A save that never started its thread: the fence lifted, the directory removed."""
        self._abandon()

    def _abandon(self) -> None:
        """After a failure: unblock the worker, let every write finish, remove the directory."""
        self.fence.release(self.rt)
        if self.current is not None:
            self.current.abandon()
        if self.staging is not None:
            self.staging.drain(raise_errors=False)
        for f in self.files:
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.recycler is not None:  # taken out of the listing and partly overwritten: gone
            self.recycler.close(ignore_errors=True)
            self.recycler = None


def write_file(path: Path, data: bytes, atomic: bool = False) -> None:
    """Writes and fsyncs path; atomic: through a temporary name renamed over it."""
    target = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}") if atomic else path
    try:
        with open(target, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic:
            target.unlink(missing_ok=True)
        raise
