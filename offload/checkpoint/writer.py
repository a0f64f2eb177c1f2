"""save(): captures a step of a wrapped run and writes it in the background, committed atomically.

``save()`` returns a SaveHandle at once; a writer thread does the rest (capture.py, staging.py):

1. At the call: the small state (config, param-group options, scheduler, RNG, extra) is taken
   (multi-rank, every rank's RNG states, gathered to rank 0, and rank 0's name for the temporary
   directory, which every rank writes its files into),
   the device records are snapshotted, and a capture fence is installed on the optimizer's worker.
2. The writer streams each record's safetensors file into ``ROOT/step_N.tmp-<uuid>.<pid>@<host>/``
   through the staging ring, host records first, in the order the optimizer's worker needs them
   (the one it waits for, else the first ready: capture.py), releasing each record's fence as soon
   as its bytes are staged; then the device records' snapshots.
3. Once every write has landed: each file fsynced, ``manifest.json`` written and fsynced, the
   directory fsynced and renamed to ``ROOT/step_N/`` (the commit), the root fsynced, ``latest``
   replaced the same way (temporary name, fsync, rename), then retention prunes. With
   ``prune="before"`` the steps this commit makes surplus are taken out of the listing before
   step 2 and the new files written over theirs in place (recycle.py): the disk needs room for
   keep_last checkpoints instead of keep_last + 1, and the writes run on blocks already allocated.

A save that fails (a full disk, EIO) removes its temporary directory, releases every fence and
keeps the error for ``wait()``; nothing of it is ever listed as a checkpoint. A second save()
while one is in flight first waits for it (that wait counts as the new save's stall).
``save(...).wait()`` is the synchronous form.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from offload import io as oio
from offload._version import __version__
from offload.checkpoint import ranks, state
from offload.checkpoint.capture import CaptureFence, snapshot, snapshot_bytes, step_reserve
from offload.checkpoint.format import (
    FORMAT_VERSION,
    WHOLE_FORMAT_VERSION,
    CheckpointError,
    shard_filename,
    step_dirname,
    temp_dirname,
)
from offload.checkpoint.handle import SaveHandle, SaveStats
from offload.checkpoint.job import SaveJob, plan_record, write_order
from offload.checkpoint.retention import Retention
from offload.checkpoint.staging import Staging, chunk_size
from offload.config import config_to_dict
from offload.engine.runtime import Runtime

__all__ = ["PRUNE_WHEN", "SaveHandle", "SaveStats", "drain", "save"]

PRUNE_WHEN = ("after", "before")  # save(prune=...): when the steps retention drops are removed


class _Saver:
    """Per runtime: the save in flight and the staging ring its saves reuse."""

    def __init__(self) -> None:
        self.current: SaveHandle | None = None
        self.staging: Staging | None = None
        self.direct: dict[Path, bool] = {}
        self.reserve = 0  # device memory a training step needs: the most measured at any save
        self.snapshot = 0  # device bytes the last save's snapshot took (it may be in the peak)

    def wait_idle(self) -> None:
        """Waits for the save in flight (its error stays with its handle)."""
        if self.current is not None:
            with contextlib.suppress(BaseException):
                self.current.wait()
            self.current = None

    def staging_for(self, rt: Runtime, largest: int, nbytes: int | None) -> Staging:
        chunk = chunk_size(largest)
        chunks = max(2, -(-(2 * largest if nbytes is None else nbytes) // chunk))
        s = self.staging
        if s is None or s.chunk_bytes != chunk or s.chunks != chunks:
            if s is not None:
                s.close()
            self.staging = s = Staging(chunk, chunks, pin=rt.device.cuda)
        return s


_SAVERS: weakref.WeakKeyDictionary[Runtime, _Saver] = weakref.WeakKeyDictionary()


def _saver(rt: Runtime) -> _Saver:
    if not _SAVERS:
        atexit.register(_drain_all)  # registered again after _drain_all emptied it: harmless
    return _SAVERS.setdefault(rt, _Saver())


def drain(rt: Runtime, release: bool = False) -> None:
    """Waits for rt's save in flight, if any (load() calls it before changing records).
    release: then also frees the staging ring its saves reuse (pinned host memory, as large as
    staging_bytes asked); the next save makes a new one."""
    saver = _SAVERS.get(rt)
    if saver is not None:
        saver.wait_idle()
        if release and saver.staging is not None:
            saver.staging.close()
            saver.staging = None


def _drain_all() -> None:
    """At exit: finish the saves in flight (a checkpoint is not lost because the script ended),
    then free the staging rings."""
    for saver in list(_SAVERS.values()):
        handle = saver.current
        if handle is not None:
            seen = handle._reported
            try:
                handle.wait()
            except BaseException as e:
                if not seen:  # a failure its caller never waited for
                    print(f"offload: the checkpoint {handle.path} failed: {e}", flush=True)
            saver.current = None
        if saver.staging is not None:
            saver.staging.close()
            saver.staging = None
    _SAVERS.clear()


def save(
    model: Any,
    optimizer: Any,
    root: str | os.PathLike[str],
    *,
    step: int,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    keep_every: int | None = None,
    prune: str = "after",
    staging_bytes: int | None = None,
) -> SaveHandle:
    """Starts saving masters, Adam state, step counts, param-group options, the scheduler's state,
    RNG states and extra (plain JSON data, e.g. the data stream's state_dict) as
    ``root/step_<step>``, as of this call; returns at once. Call it after optimizer.step().
    With keep_last, older committed steps are pruned after the commit (retention.py): the newest
    keep_last and every step divisible by keep_every stay, and never the one just written.
    prune="before" takes the steps the commit will make surplus out of the listing when the
    writer starts and writes the new files over theirs (recycle.py): room for keep_last
    checkpoints suffices, but only keep_last - 1 are committed while the save runs.
    staging_bytes bounds the staging ring (default: two records' worth)."""
    t0 = time.perf_counter()
    retention = None
    if keep_last is not None:
        retention = Retention(keep_last=keep_last, keep_every=keep_every)
    elif keep_every is not None:
        raise ValueError(f"keep_every = {keep_every!r} needs keep_last")
    if prune not in PRUNE_WHEN:
        raise ValueError(f"prune = {prune!r}: must be one of {', '.join(PRUNE_WHEN)}")
    if prune == "before" and retention is None:
        raise ValueError('prune = "before" needs keep_last (it says which steps the save writes over)')
    if staging_bytes is not None and staging_bytes < 1:
        raise ValueError(f"staging_bytes = {staging_bytes!r}: must be >= 1")
    rt = state.runtime_of(model, optimizer)
    if rt.group is not None:
        rt.group.side()  # made by every rank's first save(), here, in step with the others
    sched = _plain("scheduler.state_dict()", scheduler.state_dict()) if scheduler is not None else None
    extra = _plain("extra", extra if extra is not None else {})
    root = Path(root)
    final = root / step_dirname(step)
    saver = _saver(rt)
    saver.wait_idle()  # one save at a time: the staging ring and the fence are the runtime's
    waited_s = time.perf_counter() - t0
    # Multi-rank: every rank's RNG states go to rank 0 here, on the side channel, which every rank
    # reaches, and only now that the save before this one no longer uses that channel.
    rng = state.rng_entries(rt.group)
    tmp_name = temp_dirname(final.name)  # rank 0's: it makes the directory, every rank writes there
    if rt.group is not None:
        tmp_name = ranks.broadcast_json(rt.group, tmp_name)
    with rt.tracer.span("save", "host", step=step):
        handle = SaveHandle(final, step)
        try:
            # Inside the agreement below: a rank that refuses the save must not leave the others
            # waiting for it.
            if final.exists():
                raise FileExistsError(f"checkpoint {final} already exists")
            rt.check_update()  # an update that already failed: the records do not hold a step
            job: SaveJob | None = _start(
                rt,
                model,
                optimizer,
                saver,
                root / tmp_name,
                handle,
                sched,
                rng,
                extra,
                retention,
                prune,
                staging_bytes,
            )
            error: BaseException | None = None
        except BaseException as e:
            job, error = None, e
    # Multi-rank: the writers meet in collectives, so either every rank starts this save or none.
    if rt.group is not None and not rt.group.all_ok(error is None):
        if job is not None:
            job.abandon()
        raise error or CheckpointError(f"checkpoint {final}: another rank could not start this save")
    if error is not None:
        raise error
    assert job is not None
    job.waited_s = waited_s
    job.call_s = time.perf_counter() - t0
    job.t0 = t0
    handle._thread = threading.Thread(target=job.run, name="offload-checkpoint", daemon=True)
    saver.current = handle
    handle._thread.start()
    return handle


def _start(
    rt: Runtime,
    model: Any,
    optimizer: Any,
    saver: _Saver,
    tmp: Path,
    handle: SaveHandle,
    sched: Any,
    rng: dict[str, Any],
    extra: Any,
    retention: Retention | None,
    prune: str,
    staging_bytes: int | None,
) -> SaveJob:
    """Everything save() does on the caller's thread: the manifest's small state, the plans, the
    fence and the device snapshots. Multi-rank: this rank's plans (its shards; rank 0 also the
    replicated records, which it alone writes and snapshots)."""
    group = rt.group
    base = {
        "format_version": WHOLE_FORMAT_VERSION if group is None else FORMAT_VERSION,
        "offload_version": __version__,
        "step": handle.step,
        "created_unix": time.time(),
        "model_class": type(getattr(model, "module", model)).__name__,
        "config": config_to_dict(rt.cfg),
        "model_config": state.model_config(model),
        "optimizer": {"param_groups": state.param_groups_state(optimizer)},
        "scheduler": sched,
        **rng,
        "extra": extra,
    }
    if group is not None:
        base["ranks"] = ranks.layout(rt)
    rank = None if group is None else group.rank
    plans = [
        plan_record(rec, refs, rank)
        for rec, refs in state.params_of(rt)
        if rank in (None, 0) or rec.shard is not None
    ]
    names = set()  # every rank's files: rank 0 keeps a surplus step's file of each (prune="before")
    if group is not None:
        names = {
            shard_filename(r.name, k) for r in rt.records() if r.shard is not None for k in range(group.world)
        }
    largest = max((p.nbytes for p in plans), default=1)
    root = tmp.parent

    def direct_for() -> bool:  # the other ranks' writer threads ask once rank 0 made the directory
        if root not in saver.direct:
            saver.direct[root] = oio.check_direct(root).ok
        return saver.direct[root]

    if rank in (None, 0):
        root.mkdir(parents=True, exist_ok=True)
        direct_for()
        tmp.mkdir()

    host = write_order([p for p in plans if not p.rec.on_device], rt.cfg.optimizer.overlap_backward)
    fenced = [p.rec for p in host]
    fence = CaptureFence(fenced, rt.tracer)
    fence.install(rt, fenced)
    try:
        on_device = [p.rec for p in plans if p.rec.on_device]
        saver.reserve = max(saver.reserve, step_reserve(rt.device.torch) - saver.snapshot)
        snaps, where = snapshot(rt, on_device, saver.reserve)
        saver.snapshot = snapshot_bytes(on_device) if where == "device" else 0
    except BaseException:
        fence.release(rt)
        if rank in (None, 0):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SaveJob(
        rt=rt,
        handle=handle,
        tmp=tmp,
        retention=retention,
        recycle=prune == "before",
        staging_for=lambda: saver.staging_for(rt, largest, staging_bytes),
        direct_for=direct_for,
        names=names,
        plans=host + [p for p in plans if p.rec.on_device],
        fence=fence,
        snaps=snaps,
        device_copy=where,
        manifest=base,
        stream=torch.cuda.Stream(rt.device.torch) if rt.device.cuda else None,
        group=rt.group,
    )


def _plain(what: str, value: Any) -> Any:
    """value as it will read back from JSON; a ValueError naming what when it is not plain data."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON data (dicts, lists, str, numbers): {e}") from None
