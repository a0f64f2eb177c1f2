"""What one record's checkpoint file holds: its parameters (or, multi-rank, their parts in one
rank's shard), the safetensors header and the index entries, planned before any byte moves.

A whole record's file holds each parameter's master, exp_avg and exp_avg_sq unflattened. A rank's
file of a sharded record (``block.N.rank0000R.safetensors``, format version 2) holds, for each
parameter that overlaps the rank's shard of the record's flat buffer, the overlapping elements
as a 1-D tensor under the parameter's key (``Span``: elements [lo, hi) of the flattened
parameter). Parameters are always addressed by name and element range, never by flat offset, so
a checkpoint does not depend on the layout that wrote it (pieces.py reads either kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from offload.checkpoint import state
from offload.checkpoint.format import KINDS, record_filename, shard_filename, tensor_key
from offload.checkpoint.staging import safetensors_header
from offload.store.record import BlockRecord


@dataclass(frozen=True, slots=True)
class Span:
    """Elements [lo, hi) of one parameter's flattened elements: the whole parameter, or the part
    of it in this rank's shard."""

    ref: state.ParamRef
    lo: int
    hi: int


@dataclass(slots=True)
class RecordPlan:
    """One record's file: its parameters (or their parts in this rank's shard), header and size."""

    rec: BlockRecord
    spans: list[Span]
    file: str
    header: bytes
    index: dict[str, Any]
    rank: int | None = None  # the rank whose shard the file holds; None: whole parameters

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(e["nbytes"] for e in self.index.values())

    @property
    def refs(self) -> list[state.ParamRef]:
        return [s.ref for s in self.spans]

    def part(self, span: Span, flat: torch.Tensor) -> torch.Tensor:
        """span's elements of flat, the record's flat buffer (its shard, when sharded)."""
        base = self.rec.shard[0] if self.rank is not None and self.rec.shard is not None else 0
        at = span.ref.slot.offset - base
        return flat[at + span.lo : at + span.hi]


def write_order(plans: list[RecordPlan], overlap: bool) -> list[RecordPlan]:
    """Host records in the order their next updates run: during backward (overlap_backward), the
    last block first and the residents after it; at step(), the residents, then block 0, 1, ..."""
    if overlap:
        return sorted(plans, key=lambda p: (p.rec.index < 0, -p.rec.index))
    return sorted(plans, key=lambda p: p.rec.index)


def plan_record(rec: BlockRecord, refs: list[state.ParamRef], rank: int | None = None) -> RecordPlan:
    """rec's file: every parameter whole, or (rank given, rec sharded) the parts of them in the
    rank's shard, each a 1-D tensor of the parameter's key."""
    if rank is None or rec.shard is None:
        spans = [Span(ref, 0, ref.slot.numel) for ref in refs]
        shapes = [tuple(ref.slot.shape) for ref in refs]
        file, rank = record_filename(rec.name), None
    else:
        lo, hi = rec.shard
        spans = []
        for ref in refs:
            a, b = max(lo, ref.slot.offset), min(hi, ref.slot.offset + ref.slot.numel)
            if a < b:
                spans.append(Span(ref, a - ref.slot.offset, b - ref.slot.offset))
        shapes = [(s.hi - s.lo,) for s in spans]
        file = shard_filename(rec.name, rank)
    items = [
        (tensor_key(kind, s.ref.names[0]), torch.float32, shape)
        for s, shape in zip(spans, shapes)
        for kind in KINDS
    ]
    header, index = safetensors_header(items)
    return RecordPlan(rec, spans, file, header, index, rank)
