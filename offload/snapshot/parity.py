"""Moving snapshot bytes between the nodes of a coding group over torch.distributed (gloo).

Ranks may be on different hosts, so the transport is torch.distributed, not the keepers' sockets:
a process group of its own (gloo, made by the Snapshotter), so that a snapshot's exchange, run on
a background thread, never interleaves with the training collectives on the default group.

``encode_stripes`` computes a snapshot's parity (topology.py has the placement): every node sends
data chunk i to the leader of that chunk's stripe; each leader encodes its stripe's m parity cells
(codec.encode), keeps parity 0 and sends parity j to the stripe's j-th holder. The bytes move in
pieces of ``piece`` bytes, so a leader holds k + m - 1 pieces at a time, not k whole chunks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from offload.snapshot import codec
from offload.snapshot.topology import Topology


def transfer(
    pg: Any, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
) -> None:
    """Posts every send (tensor, global rank) and receive, then waits for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer, pg) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, pg) for t, peer in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def gather_json(pg: Any, obj: Any) -> list[Any]:
    """Every rank's obj (plain JSON data), in rank order; a collective of pg."""
    raw = json.dumps(obj, separators=(",", ":")).encode()
    size = torch.tensor([len(raw)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(sizes, size, group=pg)
    top = int(max(s.item() for s in sizes))
    mine = torch.zeros(top, dtype=torch.uint8)
    mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    parts = [torch.zeros(top, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(parts, mine, group=pg)
    return [json.loads(bytes(p[: int(s.item())].numpy())) for p, s in zip(parts, sizes)]


def encode_stripes(
    pg: Any, topo: Topology, data: torch.Tensor, cells: torch.Tensor, chunk: int, piece: int
) -> None:
    """Fills this node's m parity cells (``cells``: m * chunk bytes) from the k data chunks of
    every node of the group (``data``: this node's k * chunk bytes). A collective of the group."""
    k, m, n, group = topo.k, topo.m, topo.node, topo.group
    if m == 0:
        return
    piece = min(piece, chunk)
    inbox = [torch.empty(piece, dtype=torch.uint8) for _ in range(k)]
    extra = [torch.empty(piece, dtype=torch.uint8) for _ in range(m - 1)]
    for o in range(0, chunk, piece):
        b = min(piece, chunk - o)
        sends = [
            (data[i * chunk + o : i * chunk + o + b], group[topo.stripe_of_chunk(n, i)]) for i in range(k)
        ]
        # This node leads stripe n: member i sends its chunk i.
        recvs = [(inbox[i][:b], group[topo.member(n, i)]) for i in range(k)]
        transfer(pg, sends, recvs)
        out = [cells[o : o + b], *(e[:b] for e in extra)]  # parity 0 of stripe n is this node's cell 0
        codec.encode([x[:b] for x in inbox], m, out=out)
        sends = [(extra[j - 1][:b], group[topo.holder(n, j)]) for j in range(1, m)]
        # Cell j here is parity j of stripe n - j, sent by that stripe's leader.
        recvs = [
            (cells[j * chunk + o : j * chunk + o + b], group[topo.stripe_of_cell(n, j)]) for j in range(1, m)
        ]
        transfer(pg, sends, recvs)
