"""Restoring a restarted job: from the keepers' memory, rebuilt from parity, else from disk.

``restore`` is a collective of every rank (each calls ``Snapshotter.restore`` at start-up):

1. Each rank reports what its keeper holds of the job (``_status``: steps, chunks and cells that
   pass their crc32); the reports are gathered, and survey.choose picks the newest step the
   group can put together.
2. Chunks lost with a node (or failing their crc32) are decoded from k surviving cells of their
   stripe, sent by their holders, into a segment of the rank's (new) keeper; the rank's header
   then commits the step there again, so a second crash finds it.
3. Each rank loads its payload into the run (payload.load) and clears its slots holding any newer,
   incomplete step, so that the next snapshot cannot be confused with them.

If more nodes of a coding group are gone than its parity covers, the newest step on disk every rank
can load is loaded instead, agreed by all ranks (survey.choose_disk): a snapshot flushed under
``flush_dir`` that every rank has its file of, or an ``offload.save`` checkpoint that every rank
sees (whole parameters, written by rank 0 of a multi-rank run, loaded by every rank at any world
size) under ``flush_dir``, or under ``checkpoint_dir`` when some keeper still holds a step of the
job (the trace of a crash: a finished run leaves its last checkpoint there too, and drops its
snapshots), with a message saying what was lost and what is loaded; with neither, SnapshotLost
says so. A job no keeper holds a step of and nothing on disk starts fresh (source "none").

Each step a rank runs on its own (reading its keeper, loading, clearing) is followed by an agreement
(``_agreed``): a rank that fails there re-raises its error once every rank knows, and every other
rank raises naming it (``rank 1 could not restore job ...: <reason>``), instead of waiting in the
next collective until the group's timeout. Nothing in the keepers is cleared before every rank has
loaded, so a failed restore can be run again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
import torch.distributed as dist

from offload.snapshot import codec, flush, parity, payload, segment
from offload.snapshot.keeper import KeeperError
from offload.snapshot.survey import Plan, Rebuild, choose, choose_disk, lost, unseen_note
from offload.utils import crc

if TYPE_CHECKING:
    from offload.snapshot.client import Segment
    from offload.snapshot.snapshotter import Snapshotter

T = TypeVar("T")


class SnapshotLost(RuntimeError):
    """The in-memory snapshot cannot be restored and there is no disk checkpoint to fall back to."""


class RestoreFailed(RuntimeError):
    """Another rank could not restore (with an error of a kind not in _KINDS); the message names
    it and its reason."""


_KINDS: dict[str, type[Exception]] = {
    c.__name__: c for c in (SnapshotLost, payload.SnapshotMismatch, KeeperError)
}
"""The failed rank's errors the other ranks raise in kind, so that every rank handles the failure
alike (offload train falls back to --resume on SnapshotLost, and refuses the others)."""


@dataclass(frozen=True, slots=True)
class Restored:
    source: Literal["keeper", "parity", "disk", "none"]
    """Where this rank's state came from."""
    step: int | None
    """The step restored (None: nothing; training starts fresh)."""
    extra: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0
    rebuilt: tuple[int, ...] = ()
    """Ranks whose snapshot was rebuilt from parity."""
    path: Path | None = None
    """Source "disk": the flushed step's directory or the checkpoint that was loaded."""


def restore(snap: Snapshotter, scheduler: Any) -> Restored:
    t0 = time.perf_counter()
    mine = _agreed(snap, "reading its keeper", lambda: _status(snap))
    statuses = [mine] if snap.pg is None else parity.gather_json(snap.pg, mine)
    plan = choose(statuses, snap.topo.m)
    if plan is None:
        return _fallback(snap, scheduler, statuses, t0)
    at = f"step {plan.step}"
    seg, data = _agreed(snap, f"preparing its keeper for {at}", lambda: _region(snap, plan))
    failure = _rebuild(snap, plan, data)
    extra = _agreed(snap, f"loading {at}", lambda: _load(snap, plan, seg, data, failure, scheduler))
    # Only once every rank has loaded: a failed restore leaves the newer steps where they were.
    _agreed(snap, "clearing its newer steps", lambda: _clear_newer(snap, plan.step))
    rebuilt = tuple(plan.rebuilt_ranks)
    from_keepers = [r for r in range(snap.world) if r not in rebuilt]
    message = f"offload snapshot: restored step {plan.step} of job '{snap.cfg.job}'"
    message += f": ranks {from_keepers} from their keepers" if from_keepers else ""
    message += f", ranks {list(rebuilt)} rebuilt from parity" if rebuilt else ""
    _say(snap, message)
    return Restored(
        source="parity" if snap.rank in rebuilt else "keeper",
        step=plan.step,
        extra=extra,
        message=message,
        seconds=time.perf_counter() - t0,
        rebuilt=rebuilt,
    )


def _agreed(snap: Snapshotter, what: str, step: Callable[[], T]) -> T:
    """step() (which runs no collective) on this rank, then every rank's agreement on it: a rank
    whose step fails raises its error after taking part, and every other rank raises naming it."""
    try:
        result = step()
    except Exception as e:
        _agree(snap, what, e)
        raise
    _agree(snap, what, None)
    return result


def _agree(snap: Snapshotter, what: str, failure: Exception | None) -> None:
    """Whether every rank got through a step: an all-reduce of a flag over the snapshot group,
    then, only when some rank failed, an all-gather of the reasons (the flag is the same on every
    rank, so every rank runs the same collectives). Raises on the ranks that did not fail."""
    if snap.pg is None:
        return
    flag = torch.tensor([int(failure is not None)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=snap.pg)
    if not flag.item():
        return
    mine = None if failure is None else [type(failure).__name__, str(failure)]
    reports = parity.gather_json(snap.pg, mine)
    if failure is None:
        raise _failed_elsewhere(snap, what, reports)


def _failed_elsewhere(snap: Snapshotter, what: str, reports: list[Any]) -> Exception:
    """The error of a rank that got through a step that others failed (reports: each rank's
    [kind, reason], None where it did not fail), of the first failed rank's kind (_KINDS)."""
    failed = {r: rep for r, rep in enumerate(reports) if rep is not None}
    reasons = "; ".join(
        f"rank {r} could not restore job '{snap.cfg.job}' ({what}): {kind}: {reason}"
        for r, (kind, reason) in failed.items()
    )
    first_kind = next(iter(failed.values()))[0]
    return _KINDS.get(first_kind, RestoreFailed)(f"offload snapshot: {reasons}")


def _status(snap: Snapshotter) -> dict[str, Any]:
    """What this rank's keeper holds of the job, for survey.choose."""
    topo, slots, seen = snap.topo, [], False
    for slot in range(snap.cfg.buffers):
        h = snap.header(slot)
        if h is None:
            continue
        seen = seen or h.step >= 0
        if (h.world, h.group, h.m) != (topo.world, topo.group, topo.m):
            continue  # taken by a job of another shape: not restorable here
        seg = snap.segments[slot]
        slots.append(
            {
                "slot": slot,
                "step": h.step,
                "parity_step": h.parity_step,
                "chunk": h.chunk,
                "k": h.k,
                "good": segment.good_chunks(seg.mm, h),
                "cells": segment.good_cells(seg.mm, h),
                "members": {str(c.stripe): list(c.members) for c in h.cells},
            }
        )
    return {"rank": snap.rank, "group": list(topo.group), "seen": seen, "slots": slots}


def _region(snap: Snapshotter, plan: Plan) -> tuple[Segment, torch.Tensor]:
    """This rank's segment of plan.step and the payload region in it: a fresh slot when its keeper
    holds nothing of the step (a new keeper: the step is rebuilt whole)."""
    chunk, slot = plan.chunk, plan.slots[snap.rank]
    seg = snap.segments[slot] if slot is not None else snap.segment_for(chunk)
    if slot is None:  # nothing of this step here (a new keeper): rebuilt whole into a fresh slot
        seg.write_header(snap.blank(chunk))
    whole = torch.frombuffer(seg.mm, dtype=torch.uint8)
    return seg, whole[segment.HEADER_BYTES : segment.HEADER_BYTES + snap.topo.k * chunk]


def _rebuild(snap: Snapshotter, plan: Plan, data: torch.Tensor) -> Exception | None:
    """Decodes this rank's lost chunks into data and sends the cells other ranks decode from.
    Every rank walks the plan's list in the same order and takes part in every transfer, also
    after a decode failed here (its peers would wait for it until the timeout): the first failure
    is returned, for the agreement after loading."""
    failure = None
    for rb in plan.rebuild:
        cells = _exchange(snap, plan, rb)
        if cells is None or failure is not None:
            continue
        try:
            _decode(snap, plan, rb, cells, data)
        except Exception as e:
            failure = e
    return failure


def _exchange(snap: Snapshotter, plan: Plan, rb: Rebuild) -> list[Any] | None:
    """One lost chunk's transfer: its sources send their cells to rb.rank. There, the cells in
    codec order (None where not used); None on the other ranks."""
    chunk, k, m = plan.chunk, snap.topo.k, snap.topo.m
    sends = []
    for src in rb.sources:
        if src.rank == snap.rank:
            lo, hi = (segment.data_range if src.kind == "data" else segment.cell_range)(k, chunk, src.index)
            sends.append((torch.frombuffer(snap.segments[src.slot].mm, dtype=torch.uint8)[lo:hi], rb.rank))
    if rb.rank != snap.rank:
        parity.transfer(snap.pg, sends, [])
        return None
    inbox = {src.position: torch.empty(chunk, dtype=torch.uint8) for src in rb.sources}
    parity.transfer(snap.pg, [], [(inbox[src.position], src.rank) for src in rb.sources])
    return [inbox.get(p) for p in range(k + m)]


def _decode(snap: Snapshotter, plan: Plan, rb: Rebuild, cells: list[Any], data: torch.Tensor) -> None:
    """Decodes lost chunk rb.chunk from cells into data; SnapshotLost if it fails its crc32."""
    chunk, k, m = plan.chunk, snap.topo.k, snap.topo.m
    out: list[Any] = [None] * k
    out[rb.chunk] = data[rb.chunk * chunk : (rb.chunk + 1) * chunk]
    for p in range(k):
        if cells[p] is None and p != rb.chunk:
            out[p] = torch.empty(chunk, dtype=torch.uint8)  # another lost member of the stripe: unused
    codec.decode(cells, k, m, out=out)
    got = crc.crc32(out[rb.chunk].numpy().data)
    if got != rb.crc:
        raise SnapshotLost(
            f"chunk {rb.chunk} of rank {rb.rank} rebuilt from parity fails its crc32 "
            f"({got:#x}, the snapshot's was {rb.crc:#x})"
        )


def _load(
    snap: Snapshotter,
    plan: Plan,
    seg: Segment,
    data: torch.Tensor,
    failure: Exception | None,
    scheduler: Any,
) -> dict[str, Any]:
    """Loads this rank's payload of plan.step (data) into the run; returns its extra. Rebuilt
    chunks are committed in the keeper first; failure (of the rebuild) is raised instead."""
    if failure is not None:
        raise failure
    if any(rb.rank == snap.rank for rb in plan.rebuild):
        chunk = plan.chunk
        crcs = tuple(crc.crc32(data[i * chunk : (i + 1) * chunk].numpy().data) for i in range(snap.topo.k))
        # The rebuilt data is committed in this keeper again, so that a second crash finds it
        # (its parity cells come with the next snapshot).
        seg.write_header(replace(snap.blank(chunk), step=plan.step, crcs=crcs))
    where = f"the snapshot of step {plan.step} of job '{snap.cfg.job}' (rank {snap.rank})"
    idx, _ = payload.read_index(data.numpy())
    payload.check(idx, snap.rt, snap.rank, snap.world, where)
    return payload.load(snap.rt, snap.optimizer, data, scheduler=scheduler, where=where)


def _clear_newer(snap: Snapshotter, step: int) -> None:
    for slot in range(snap.cfg.buffers):
        h = snap.header(slot)
        if h is not None and max(h.step, h.parity_step) > step:
            snap.segments[slot].write_header(h.invalid())


def _fallback(snap: Snapshotter, scheduler: Any, statuses: list[dict[str, Any]], t0: float) -> Restored:
    gone = lost(statuses)
    seen = any(st["seen"] for st in statuses)
    if gone is None:
        what = f"no keeper holds a snapshot of job '{snap.cfg.job}'"
    else:
        step, ranks = gone
        m = snap.topo.m
        what = (
            f"the in-memory snapshot of job '{snap.cfg.job}' is lost: step {step} is gone from "
            f"ranks {ranks} (their node or keeper lost, or the snapshot incomplete), more than "
            + (
                f"the {m} lost node(s) per coding group parity can rebuild"
                if m
                else "can be rebuilt (parity 0)"
            )
        )
    roots = _roots(snap, seen)
    disk, note = _on_disk(snap, roots)
    if disk is None:
        if not seen:
            message = f"offload snapshot: {what}, and no disk snapshot: starting fresh"
            _say(snap, message)
            return Restored(source="none", step=None, message=message, seconds=time.perf_counter() - t0)
        where = (
            "in " + " or ".join(str(r) for r in dict.fromkeys(roots))
            if roots
            else "(neither SnapshotConfig.flush_dir nor checkpoint_dir is set)"
        )
        raise SnapshotLost(
            f"offload snapshot: {what}; and there is no disk checkpoint {where} to fall back to{note}"
        )
    kind, step, path = disk
    shown = path.parent if kind == "flushed" else path  # the step's directory: the same on every rank
    message = f"offload snapshot: {what}; falling back to the disk checkpoint {shown} (step {step}){note}"
    _say(snap, message)
    extra = _agreed(snap, f"loading {shown}", lambda: _load_disk(snap, kind, path, scheduler))
    # What the keepers still hold of the lost run must not mix with the next (once every rank loaded).
    _agreed(snap, "clearing its newer steps", lambda: _clear_newer(snap, step))
    return Restored(
        source="disk",
        step=step,
        extra=extra,
        message=message,
        seconds=time.perf_counter() - t0,
        path=shown,
    )


def _roots(snap: Snapshotter, seen: bool) -> list[Path]:
    """Where the disk fallback looks for checkpoints: flush_dir, then checkpoint_dir if some keeper
    held a step of the job (seen: a crashed run, not a finished one or none)."""
    dirs = (snap.cfg.flush_dir, snap.cfg.checkpoint_dir if seen else None)
    return [Path(d) for d in dirs if d is not None]


def _on_disk(snap: Snapshotter, roots: list[Path]) -> tuple[tuple[str, int, Path] | None, str]:
    """The newest step on disk that every rank can load, agreed by all of them (a collective): a
    snapshot flushed to flush_dir, ("flushed", step, this rank's file), or a checkpoint under
    roots, ("checkpoint", step, its directory); or None. And a note naming a newer checkpoint
    that not every rank sees (else "")."""
    mine = _agreed(snap, "listing the checkpoints on disk", lambda: _disk_report(snap, roots))
    reports = [mine] if snap.pg is None else parity.gather_json(snap.pg, mine)
    choice = choose_disk(reports)
    note = unseen_note(reports, None if choice is None else choice[1])
    if choice is None:
        return None, note
    kind, step = choice
    if kind == "flushed" and snap.cfg.flush_dir is not None:
        return (kind, step, flush.rank_file(Path(snap.cfg.flush_dir), step, snap.rank)), note
    return (kind, step, Path(mine["paths"][str(step)])), note


def _disk_report(snap: Snapshotter, roots: list[Path]) -> dict[str, Any]:
    """What this rank sees on disk, for survey.choose_disk."""
    from offload.checkpoint import list_checkpoints

    saved: dict[int, Path] = {}
    for root in reversed(roots):  # the first root's checkpoint of a step wins
        saved.update(list_checkpoints(root))
    flush_root = None if snap.cfg.flush_dir is None else Path(snap.cfg.flush_dir)
    flushed = [] if flush_root is None else flush.flushed_steps(flush_root, rank=snap.rank)
    return {"flushed": flushed, "saved": sorted(saved), "paths": {str(k): str(v) for k, v in saved.items()}}


def _load_disk(snap: Snapshotter, kind: str, path: Path, scheduler: Any) -> dict[str, Any]:
    """Loads the disk checkpoint chosen (a flushed snapshot or an offload.save checkpoint)."""
    if kind == "checkpoint":
        from offload.checkpoint import load

        return load(snap.model, snap.optimizer, path, scheduler=scheduler)
    return _load_flushed(snap, path, scheduler)


def _load_flushed(snap: Snapshotter, path: Path, scheduler: Any) -> dict[str, Any]:
    h, raw = flush.read(path)
    if (h.job, h.rank, h.world) != (snap.cfg.job, snap.rank, snap.world):
        raise payload.SnapshotMismatch(
            f"{path} holds rank {h.rank} of {h.world} of job '{h.job}', not rank {snap.rank} of "
            f"{snap.world} of job '{snap.cfg.job}'"
        )
    data = torch.frombuffer(raw, dtype=torch.uint8)
    idx, _ = payload.read_index(raw)
    payload.check(idx, snap.rt, snap.rank, snap.world, str(path))
    return payload.load(snap.rt, snap.optimizer, data, scheduler=scheduler, where=str(path))


def _say(snap: Snapshotter, message: str) -> None:
    if snap.rank == 0:
        print(message, file=sys.stderr, flush=True)
