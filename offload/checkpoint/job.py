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

Multi-rank, every rank runs one of these: each writes its shard of every streamed block into a
file of its own (``block.N.rank0000R.safetensors``: each parameter's part that falls into the
shard, as a 1-D tensor) through its own ring, and rank 0 also writes the replicated records.
Then every rank reports to rank 0 (ranks.py: its error, or its index entries once its files are
fsynced); rank 0 writes the manifest only when every report is good, commits, and sends its
verdict, so a failure on any rank fails the save on every rank. Each rank goes through every
collective exactly once whatever failed before it (``_guarded``), so no rank waits forever.
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
from offload.checkpoint import ranks, state
from offload.checkpoint.capture import CaptureFence, Snapshot
from offload.checkpoint.format import (
    KINDS,
    LATEST,
    MANIFEST,
    CheckpointError,
    fsync_dir,
    tensor_key,
)
from offload.checkpoint.handle import SaveHandle, SaveStats
from offload.checkpoint.recordfile import RecordPlan, Span, plan_record, write_order
from offload.checkpoint.recycle import Recycler
from offload.checkpoint.retention import Retention, doomed, prune
from offload.checkpoint.staging import FileStream, Staging, Tally
from offload.engine.runtime import Runtime
from offload.utils.priority import lower_thread_priority

__all__ = ["RecordPlan", "SaveJob", "Span", "plan_record", "write_order"]


@dataclass(slots=True, kw_only=True)
class SaveJob:
    """The writer thread's work for one save."""

    rt: Runtime
    handle: SaveHandle
    tmp: Path
    retention: Retention | None
    staging_for: Callable[[], Staging]  # the runtime's ring, made (or remade) on first use
    staging: Staging | None = None  # made by run(): mapping and pinning a new ring takes seconds
    direct_for: Callable[[], bool]  # whether O_DIRECT works under the root (checked once per root)
    direct: bool = False
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
    shards: dict[str, Any] = field(default_factory=dict)  # multi-rank: this rank's shard of each tensor
    staged: list[tuple[RecordPlan, FileStream]] = field(default_factory=list)  # crc32s pending
    bytes: int = 0
    t0: float = 0.0
    call_s: float = 0.0
    waited_s: float = 0.0
    group: Any = None  # multi-rank: the Collective (its side channel carries the reports to rank 0)
    failed: BaseException | None = None  # multi-rank: this rank's first error
    recycle: bool = False  # prune="before": write over the files of the steps this save makes surplus
    names: set[str] = field(default_factory=set)  # every file of this save, of every rank (recycle)
    tally: Tally = field(default_factory=Tally)  # the ring's tally when this save took it
    recycler: Recycler | None = None
    reused: int = 0  # bytes written over a surplus step's files
    prune_s: float = 0.0
    commit_s: float = 0.0
    ring_s: float = 0.0

    def run(self) -> None:
        lower_thread_priority()  # the writer gives way to training (offload.utils.priority)
        start = time.perf_counter()
        try:
            if self.group is None:
                self._run_alone()
            else:
                self._run_ranked()
        except BaseException as e:
            self.handle._error = e
            self._abandon()
        finally:
            self.fence.release(self.rt)
            self.snaps.clear()
            self.handle._stats = self._stats(start, self.tally)
            self.handle._done.set()

    def _run_alone(self) -> None:
        self._prepare()
        self._write_all()
        self.fence.release(self.rt)
        self._finish()

    def _write_all(self) -> None:
        for plan in self._order():
            with self.rt.tracer.span("checkpoint", "io", block=plan.rec.index):
                self._write(plan)

    def _stats(self, start: float, tally: Tally) -> SaveStats:
        """Multi-rank: each rank's own files (rank 0's: and the manifest)."""
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
        """The plans in the order they are written: each host record when the capture fence says it
        is the one to take (the worker waits for it, or it is the first ready, see
        CaptureFence.next_ready); while none is ready (the updates queued before save() still
        run), a device snapshot, so the disk does not wait with them; then the other snapshots.
        Multi-rank, each rank follows its own worker: its writes meet the others' only at the end."""
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

    def _prepare(self) -> None:
        """On the writer thread, not in save(): the staging ring (made on a runtime's first save,
        or when its size changes), whether O_DIRECT works there, and, with prune="before", the
        steps to write over (multi-rank: rank 0 takes them)."""
        t = time.perf_counter()
        self.staging = self.staging_for()
        self.ring_s = time.perf_counter() - t
        self.tally = replace(self.staging.tally)
        self.direct = self.direct_for()
        if self.group is None or self.group.rank == 0:
            self._recycle()

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
            self.recycler = Recycler.take(root, surplus, self.names | {p.file for p in self.plans})
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
        sums are done); a rank's shards of a tensor with the range of its elements they hold."""
        for plan, fs in self.staged:
            crcs = fs.crcs()
            if plan.rank is None:
                for key, entry in plan.index.items():
                    self.tensors[key] = {"file": plan.file, **entry, "crc32": crcs[key]}
                continue
            for span in plan.spans:
                shape = list(span.ref.slot.shape)
                whole = {"dtype": "F32", "shape": shape, "nbytes": 4 * span.ref.slot.numel}
                for kind in KINDS:
                    key = tensor_key(kind, span.ref.names[0])
                    entry = plan.index[key]
                    shard = {"rank": plan.rank, "range": [span.lo, span.hi], "file": plan.file}
                    shard.update(offset=entry["offset"], nbytes=entry["nbytes"], crc32=crcs[key])
                    self.shards[key] = {"tensor": whole, "shard": shard}
        self.staged.clear()

    # ---- multi-rank: every rank writes its shards, rank 0 commits --------------------------------

    def _run_ranked(self) -> None:
        """Every rank: prepare, write its files, flush them, report; rank 0 commits if every report
        is good; then its verdict. Each step after a failure is skipped, each collective is not."""
        group = self.group
        self._guarded(self._prepare)
        if self.recycle:
            self._share_recycled()
        self._guarded(self._write_all)
        self.fence.release(self.rt)
        self._guarded(self._flush)
        reports = ranks.gather_json(group, self._report())
        verdict: str | None = None
        if reports is not None:  # rank 0
            bad = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"] is not None]
            if not bad:
                self._guarded(lambda: self._commit_ranked(reports))
                bad = [(0, self._describe())] if self.failed is not None else []
            if bad:
                rank, error = bad[0]
                verdict = f"checkpoint {self.handle.path}: rank {rank} failed: {error}"
        verdict = ranks.broadcast_json(group, verdict)  # after rank 0's commit (or its failure)
        if self.failed is not None:
            raise self.failed
        if verdict is not None:
            raise CheckpointError(verdict)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Runs step unless this rank failed before; keeps the first error (and lifts the fence at
        once: nothing of a failed save need hold the optimizer). The rank stays in the collectives."""
        if self.failed is not None:
            return
        try:
            step()
        except Exception as e:
            self.failed = e
            self.fence.release(self.rt)

    def _describe(self) -> str:
        return f"{type(self.failed).__name__}: {self.failed}"

    def _share_recycled(self) -> None:
        """prune="before": rank 0 took the surplus steps out and kept their files; each rank gets
        the paths of the files it writes over (its own names: no two ranks claim one file). Rank 0
        removes what is left of the steps only after every rank reported, so after every claim."""
        kept = self.recycler if self.group.rank == 0 else None
        sent: dict[str, Any] = {"error": self._describe() if self.failed is not None else None}
        if kept is not None:
            sent["files"] = {name: str(path) for name, path in kept.files.items()}
        got = ranks.broadcast_json(self.group, sent)
        if got["error"] is not None and self.failed is None:
            self.failed = CheckpointError(f"rank 0 could not prepare the save: {got['error']}")
            self.fence.release(self.rt)
        if self.group.rank != 0 and self.failed is None:
            mine = {p.file for p in self.plans}
            files = {name: Path(path) for name, path in got.get("files", {}).items() if name in mine}
            self.recycler = Recycler(taken=[], files=files)  # rank 0's directories: not ours to remove

    def _flush(self) -> None:
        """This rank's files on disk: every write and crc32 sum done, each file fsynced."""
        self.ring.drain()  # every chunk's write and crc32 sum is done (or raises its error)
        self._checksums()
        for f in self.files:
            f.sync()
            f.close()

    def _report(self) -> dict[str, Any]:
        """This rank's report to rank 0: its error, or its index entries (its files are fsynced)."""
        if self.failed is not None:
            return {"error": self._describe()}
        return {"error": None, "params": self.params, "tensors": self.tensors, "shards": self.shards}

    def _commit_ranked(self, reports: list[dict[str, Any]]) -> None:
        """Rank 0, every rank's files fsynced: the manifest of them all, then the commit."""

        def merge() -> None:
            self.params, self.tensors = ranks.merge(reports)

        self._committing(merge)

    @staticmethod
    def _put(fs: FileStream, plan: RecordPlan, *flats: torch.Tensor) -> None:
        """Each parameter's (or its part's) master, exp_avg and exp_avg_sq, from the record's flat
        buffers."""
        for span in plan.spans:
            for kind, flat in zip(KINDS, flats):
                fs.put(tensor_key(kind, span.ref.names[0]), plan.part(span, flat).view(torch.uint8))

    def _finish(self) -> None:
        self._committing(self._flush)

    def _committing(self, first: Callable[[], None]) -> None:
        """first, then the commit, timed together as commit_s (a "commit" span in the trace)."""
        t = time.perf_counter()
        try:
            with self.rt.tracer.span("commit", "io", step=self.handle.step):
                first()
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
        """After a failure: unblock the worker, let every write finish, remove the directory (rank
        0's, multi-rank: every rank has reported, so none writes into it any more)."""
        self.fence.release(self.rt)
        if self.current is not None:
            self.current.abandon()
        if self.staging is not None:
            self.staging.drain(raise_errors=False)
        for f in self.files:
            f.close()
        if self.group is None or self.group.rank == 0:
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
