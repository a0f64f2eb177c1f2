"""A rank's snapshot payload: what it holds of the training state, as one flat run of bytes.

    [u64 n][index: n bytes of JSON][zeros up to a 4096 boundary: ``base``][record 0][record 1]...

Each record is its flat fp32 master, Adam m and v (the rank's shard of a streamed block, or a whole
replicated record) and its Adam step count, at ``base + at``, 64-byte aligned:

    [master: 4n][exp_avg: 4n][exp_avg_sq: 4n][step: fp32, padded to 64]

The index holds the records' names, sizes and offsets (the *fingerprint*: a snapshot only loads
into a run with the same records, world size and rank), the param-group options, the scheduler's
state, this rank's RNG states and the caller's ``extra`` (the data position), all plain JSON.
Unlike a checkpoint (whole parameters by name, loadable at any placement and world size), a
snapshot is the store's own flat buffers: it restores the run it was taken from, fast.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from offload.checkpoint import state
from offload.engine.runtime import Runtime
from offload.store.record import BlockRecord

FORMAT = 1
BASE_ALIGN = 4096
_LEN = struct.Struct("<Q")


class SnapshotMismatch(ValueError):
    """A snapshot taken by another model, placement, world size or rank."""


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True, slots=True)
class Span:
    """Where one record's bytes lie, relative to ``base``."""

    at: int
    numel: int

    @property
    def nbytes(self) -> int:
        return _align(12 * self.numel + 4, 64)


def fingerprint(rt: Runtime) -> list[dict[str, Any]]:
    """What a snapshot must agree on with the run it is loaded into, per record."""
    return [
        {
            "name": r.name,
            "numel": r.numel,
            "layout": r.layout.numel,
            "shard": None if r.shard is None else list(r.shard),
            "on_device": r.on_device,
        }
        for r in rt.records()
    ]


def spans(rt: Runtime) -> list[Span]:
    out, at = [], 0
    for rec in rt.records():
        s = Span(at, rec.numel)
        out.append(s)
        at += s.nbytes
    return out


def index(
    rt: Runtime, optimizer: Any, *, job: str, step: int, rank: int, world: int, scheduler: Any, extra: Any
) -> dict[str, Any]:
    """The index of a snapshot taken now (the records' bytes are captured separately)."""
    records = fingerprint(rt)
    for entry, span in zip(records, spans(rt)):
        entry["at"] = span.at
    return {
        "format": FORMAT,
        "job": job,
        "step": step,
        "rank": rank,
        "world": world,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "records": records,
        "param_groups": state.param_groups_state(optimizer),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": state.rng_state(),
        "extra": extra,
    }


def encode_index(idx: dict[str, Any]) -> bytes:
    raw = json.dumps(idx, separators=(",", ":"), allow_nan=True).encode()
    return _LEN.pack(len(raw)) + raw


def payload_bytes(raw_index: bytes, rt: Runtime) -> int:
    """Bytes of the payload whose encoded index is raw_index."""
    return _align(len(raw_index), BASE_ALIGN) + sum(s.nbytes for s in spans(rt))


def read_index(data: Any) -> tuple[dict[str, Any], int]:
    """(index, base) of a payload (a buffer starting at its first byte)."""
    view = memoryview(data)
    (n,) = _LEN.unpack(view[: _LEN.size])
    if n > len(view) - _LEN.size:
        raise ValueError(f"a snapshot index of {n} bytes does not fit in a payload of {len(view)}")
    idx = json.loads(bytes(view[_LEN.size : _LEN.size + n]))
    return idx, _align(_LEN.size + n, BASE_ALIGN)


def views(data: torch.Tensor, base: int, span: Span) -> tuple[torch.Tensor, ...]:
    """(master, exp_avg, exp_avg_sq, step) of a record, as fp32 views of data (a flat uint8 tensor)."""
    n, at = span.numel, base + span.at
    part = data[at : at + 12 * n + 4].view(torch.float32)
    return part[:n], part[n : 2 * n], part[2 * n : 3 * n], part[3 * n :]


def capture(rt: Runtime, rec: BlockRecord, dst: tuple[torch.Tensor, ...]) -> None:
    """Copies rec's master, m, v and step count into dst. Call only while no update of rec can
    run (a capture fence holds it, or ``rt.wait_updates()`` ran and the caller does not step)."""
    with state.optimizer_state(rt, rec) as held:
        for src, out in zip((*held, rec.step.reshape(1)), dst):
            if src.is_cuda:
                out.copy_(src)  # to pageable memory: returns once the copy has landed
            else:  # one thread's memcpy: torch's would take every core from the optimizer
                np.copyto(out.numpy(), src.numpy())


def check(idx: dict[str, Any], rt: Runtime, rank: int, world: int, where: str) -> None:
    """Raises SnapshotMismatch when the snapshot at ``where`` was not taken by this run's shape."""
    if idx.get("format") != FORMAT:
        raise SnapshotMismatch(f"{where}: snapshot format {idx.get('format')}, this offload reads {FORMAT}")
    if (idx["rank"], idx["world"]) != (rank, world):
        raise SnapshotMismatch(
            f"{where}: taken by rank {idx['rank']} of {idx['world']}, loaded by rank {rank} of {world}"
        )
    ours = fingerprint(rt)
    theirs = [{k: v for k, v in r.items() if k != "at"} for r in idx["records"]]
    if theirs != ours:
        diff = next(
            (f"{a['name']}: snapshot {a}, run {b}" for a, b in zip(theirs, ours) if a != b),
            f"{len(theirs)} records in the snapshot, {len(ours)} in the run",
        )
        raise SnapshotMismatch(
            f"{where} was taken by another model or placement ({diff}): restore it into the same "
            "model, config and world size, or load a disk checkpoint instead"
        )


def load(rt: Runtime, optimizer: Any, data: torch.Tensor, *, scheduler: Any, where: str) -> dict[str, Any]:
    """Puts a payload (checked with ``check`` by the caller) into the run; returns its ``extra``."""
    idx, base = read_index(data.numpy())
    if (idx.get("scheduler") is None) != (scheduler is None):
        have = "has" if idx.get("scheduler") is not None else "has no"
        raise SnapshotMismatch(f"{where} {have} scheduler state; pass scheduler= accordingly")
    rt.wait_updates()  # host wait: no queued update may write a record while it is loaded
    for rec, entry in zip(rt.records(), idx["records"]):
        master, m, v, step = views(data, base, Span(entry["at"], entry["numel"]))
        with state.optimizer_state(rt, rec) as held:
            for dst, src in zip(held, (master, m, v)):
                dst.copy_(src)
            if rec.wire.data_ptr() != held.master.data_ptr():
                rec.wire.copy_(held.master)
        rec.step.copy_(step[0])
        rec.version += 1  # device slots and the resident buffer must copy the new weights
    rt.wait_updates()  # the tier's write-backs of the loaded state are stored
    state.load_param_groups(optimizer, idx["param_groups"])
    if scheduler is not None:
        scheduler.load_state_dict(idx["scheduler"])
    state.set_rng_state(idx["rng"])
    return dict(idx.get("extra") or {})
