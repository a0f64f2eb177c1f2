"""Which step a restarted job can restore, and where each of its chunks comes from. Pure logic.

Every rank reports what its keeper holds of the job (``status``): per segment slot, the step of its
data and which data chunks pass their crc32, the step of its parity cells and which cells pass.
From all reports, identically on every rank, ``choose`` takes the newest step S at which every
rank's data is whole: each chunk either good in its own keeper, or in a stripe with k good cells
at step S (then decoded from the first k of them). A step some rank never committed (a crash in
the middle of a snapshot) is thus still restorable when parity covers that rank.

When no step can be put together, ``choose_disk`` takes the newest step on disk that every rank can
load, from what each rank reports it sees there (``flushed``: the steps it has its own flushed file
of; ``saved``: the ``offload.save`` checkpoints it sees; ``paths``: where), and ``unseen_note``
names a newer checkpoint some ranks do not see (not on a filesystem they share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from offload.snapshot.topology import Topology


@dataclass(frozen=True, slots=True)
class Source:
    """A surviving cell used to rebuild a chunk: held by ``rank`` in its ``slot``; ``position`` in
    codec order (data members 0..k-1, then parity k..k+m-1); ``index`` the chunk or cell index."""

    rank: int
    slot: int
    kind: str  # "data" or "parity"
    index: int
    position: int


@dataclass(frozen=True, slots=True)
class Rebuild:
    """Chunk ``chunk`` of ``rank``, decoded from ``sources`` (k cells of its stripe)."""

    rank: int
    chunk: int
    stripe: int
    sources: tuple[Source, ...]
    crc: int  # the chunk's crc32 at snapshot time, from a parity cell's header


@dataclass(frozen=True, slots=True)
class Plan:
    step: int
    chunk: int  # L
    slots: dict[int, int | None]  # rank -> its slot holding data of step (None: none, rebuilt whole)
    rebuild: tuple[Rebuild, ...]

    @property
    def rebuilt_ranks(self) -> list[int]:
        return sorted({r.rank for r in self.rebuild})


def _at(status: dict[str, Any], step: int, kind: str) -> dict[str, Any] | None:
    key = "step" if kind == "data" else "parity_step"
    return next((s for s in status["slots"] if s[key] == step), None)


def choose(statuses: list[dict[str, Any]], m: int) -> Plan | None:
    """The newest restorable step and how, or None."""
    steps = {s["step"] for st in statuses for s in st["slots"] if s["step"] >= 0}
    for step in sorted(steps, reverse=True):
        plan = _plan_at(step, statuses, m)
        if plan is not None:
            return plan
    return None


def _plan_at(step: int, statuses: list[dict[str, Any]], m: int) -> Plan | None:
    world = len(statuses)
    used = [s for st in statuses for s in (_at(st, step, "data"), _at(st, step, "parity")) if s is not None]
    chunks = {s["chunk"] for s in used}
    if len(chunks) != 1:
        return None
    rebuild: list[Rebuild] = []
    slots: dict[int, int | None] = {}
    for r, st in enumerate(statuses):
        group = tuple(st["group"])
        topo = Topology(rank=r, world=world, group=group, node=group.index(r), m=m)
        mine = _at(st, step, "data")
        slots[r] = None if mine is None else mine["slot"]
        good = set() if mine is None else set(mine["good"])
        for i in range(topo.k):
            if i in good:
                continue
            job = _rebuild(statuses, topo, step, i)
            if job is None:
                return None
            rebuild.append(job)
    return Plan(step=step, chunk=chunks.pop(), slots=slots, rebuild=tuple(rebuild))


def _rebuild(statuses: list[dict[str, Any]], topo: Topology, step: int, i: int) -> Rebuild | None:
    stripe = topo.stripe_of_chunk(topo.node, i)
    sources = []
    crc = None
    for position, (node, kind, index) in enumerate(topo.cells(stripe)):
        q = topo.group[node]
        s = _at(statuses[q], step, kind)
        if s is None or index not in (s["good"] if kind == "data" else s["cells"]):
            continue
        sources.append(Source(rank=q, slot=s["slot"], kind=kind, index=index, position=position))
        if kind == "parity" and crc is None:
            crc = s["members"][str(stripe)][i]
    if len(sources) < topo.k or crc is None:
        return None
    return Rebuild(rank=topo.rank, chunk=i, stripe=stripe, sources=tuple(sources[: topo.k]), crc=crc)


def lost(statuses: list[dict[str, Any]]) -> tuple[int, list[int]] | None:
    """The newest step any keeper holds and the ranks without whole data of it (None: no step)."""
    steps = [s["step"] for st in statuses for s in st["slots"] if s["step"] >= 0]
    if not steps:
        return None
    step = max(steps)
    missing = []
    for r, st in enumerate(statuses):
        mine = _at(st, step, "data")
        if mine is None or len(mine["good"]) < mine["k"]:
            missing.append(r)
    return step, missing


def choose_disk(reports: list[dict[str, Any]]) -> tuple[str, int] | None:
    """The newest step on disk every rank can load, as ("flushed" or "checkpoint", step), or None:
    a flushed snapshot every rank has its file of, or a checkpoint every rank sees. A flushed
    snapshot wins a tie: it puts back each rank's own state (its RNG states too)."""
    flushed = set.intersection(*(set(r["flushed"]) for r in reports))
    saved = set.intersection(*(set(r["saved"]) for r in reports))
    best = None if not flushed else ("flushed", max(flushed))
    if saved and (best is None or max(saved) > best[1]):
        best = ("checkpoint", max(saved))
    return best


def unseen(reports: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Checkpoint steps some rank sees and others do not: step -> the ranks that do not see it."""
    steps = sorted({s for r in reports for s in r["saved"]})
    out = {s: [rank for rank, r in enumerate(reports) if s not in r["saved"]] for s in steps}
    return {s: ranks for s, ranks in out.items() if ranks}


def unseen_note(reports: list[dict[str, Any]], chosen: int | None) -> str:
    """A note on the newest checkpoint newer than the chosen step (None: nothing chosen) that some
    ranks do not see, naming it (from the reports' "paths") and them; "" when there is none."""
    missed = {s: ranks for s, ranks in unseen(reports).items() if chosen is None or s > chosen}
    if not missed:
        return ""
    step = max(missed)
    path = next(r["paths"][str(step)] for r in reports if step in r["saved"])
    return (
        f" (the checkpoint {path} is not seen by ranks {missed[step]}: every rank loads it, so it "
        "must be on a filesystem all of them read)"
    )
