"""The multi-rank side of a save and a load: small JSON messages over the writer's gloo group.

Each rank of a multi-rank save writes its shard of every streamed block into files of its own
(job.py); what crosses ranks is only metadata, as JSON bytes (never pickled) on
``Collective.side()``, a gloo group of its own, never mixed with the training collectives:

- at save(): the temporary directory's name (rank 0 makes the directory) and every rank's RNG
  states (state.py);
- with ``prune="before"``: the files rank 0 kept of the steps it took out, for each rank to write
  over its own (recycle.py);
- at the end: every rank's *report* to rank 0 (its error, or its tensors' index entries once its
  files are written and fsynced), then rank 0's verdict to every rank, after its commit.

``merge`` puts the reports together into the manifest's ``params`` and ``tensors``; ``layout``
records how the flat buffers were split. A load at any world size agrees on the problems every
rank found in the pieces it checked (``all_problems``), so all ranks refuse a corrupt checkpoint
or none does.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from offload.checkpoint.format import Problem
from offload.engine.dist import Collective
from offload.engine.runtime import Runtime


def gather_json(group: Collective, value: Any) -> list[Any] | None:
    """Every rank's value (plain JSON data) on rank 0, in rank order; None on the others. The
    values travel as JSON bytes, each padded with spaces (JSON whitespace) to the longest so that
    the gather moves parts of one size."""
    raw = json.dumps(value).encode()
    longest = torch.tensor([len(raw)], dtype=torch.int64)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group.side())
    part = torch.frombuffer(bytearray(raw.ljust(int(longest.item()))), dtype=torch.uint8)
    whole = group.gather_to_root(part)
    if whole is None:
        return None
    return [json.loads(row.numpy().tobytes()) for row in whole.view(group.world, -1)]


def broadcast_json(group: Collective, value: Any) -> Any:
    """Rank 0's value (plain JSON data) on every rank (the others' value is ignored)."""
    raw = json.dumps(value).encode() if group.rank == 0 else b""
    n = torch.tensor([len(raw)], dtype=torch.int64)
    dist.broadcast(n, src=0, group=group.side())
    if group.rank == 0:
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    else:
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group.side())
    return json.loads(buf.numpy().tobytes())


def all_problems(group: Collective | None, problems: list[Problem]) -> list[Problem]:
    """Every rank's problems on every rank (in rank order, duplicates once)."""
    if group is None:
        return problems
    mine = [[p.file, p.tensor, p.message] for p in problems]
    every = broadcast_json(group, gather_json(group, mine))
    out: list[Problem] = []
    for rows in every:
        for file, tensor, message in rows:
            p = Problem(file, tensor, message)
            if p not in out:
                out.append(p)
    return out


def layout(rt: Runtime) -> dict[str, Any]:
    """The manifest's ``ranks``: the world size that saved and, per sharded record, its flat
    buffer's elements, the padded size the ranks split and each rank's part (rank r held
    elements [r * per_rank, (r + 1) * per_rank))."""
    assert rt.group is not None
    records = {}
    for rec in rt.records():
        if rec.shard is not None:
            shard = rt.group.shard(rec.layout.numel)
            records[rec.name] = {"numel": rec.layout.numel, "padded": shard.padded, "per_rank": shard.numel}
    return {"world": rt.group.world, "records": records}


def merge(reports: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's params and tensors from every rank's report: rank 0's whole tensors as they
    are, each sharded tensor once with its shards in element order."""
    params: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for report in reports:
        params.update(report["params"])
        tensors.update(report["tensors"])
        for key, info in report["shards"].items():
            entry = tensors.setdefault(key, {**info["tensor"], "shards": []})
            entry["shards"].append(info["shard"])
    for entry in tensors.values():
        if "shards" in entry:
            entry["shards"].sort(key=lambda s: s["range"][0])
    return params, tensors
