"""Which node holds which chunk: the placement of data chunks and parity cells over a coding group.

A *node* is a keeper (one per host; in the tests one per rank). Ranks that share a keeper are on one
node. The ranks with the same local index on each of G nodes form a *coding group*; node n of the
group holds its own rank's snapshot, cut into k = G - m data chunks, and m parity cells of other
nodes' data, like RAID-5/6 with rotating parity:

- There are G stripes. Stripe s has its m parity cells on nodes s, s+1, ..., s+m-1 and its k data
  members on the nodes after those: member i is chunk i of node (s + m + i) mod G.
- So chunk i of node n belongs to stripe (n - m - i) mod G, and parity cell j of node n belongs to
  stripe (n - j) mod G. Each node holds one cell of m stripes and one chunk of k others; no node
  holds two cells of one stripe.

Any m lost nodes take at most m cells of each stripe, and the codec restores a stripe from any k of
its k + m cells. A node's memory is its snapshot times (k + m) / k. Stripe s's parity is computed by
its *leader*, node s (the holder of parity 0), from the k members' chunks it receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TopologyError(ValueError):
    """The job's ranks cannot form coding groups with the parity asked for."""


@dataclass(frozen=True, slots=True)
class Topology:
    rank: int
    world: int
    group: tuple[int, ...]
    """Global ranks of this rank's coding group, by node index."""
    node: int
    """This rank's index in ``group``."""
    m: int

    @property
    def nodes(self) -> int:
        return len(self.group)

    @property
    def k(self) -> int:
        return self.nodes - self.m

    def stripe_of_chunk(self, node: int, i: int) -> int:
        return (node - self.m - i) % self.nodes

    def stripe_of_cell(self, node: int, j: int) -> int:
        return (node - j) % self.nodes

    def member(self, stripe: int, i: int) -> int:
        """Node holding data member i of the stripe (its chunk i)."""
        return (stripe + self.m + i) % self.nodes

    def holder(self, stripe: int, j: int) -> int:
        """Node holding parity cell j of the stripe."""
        return (stripe + j) % self.nodes

    def cells(self, stripe: int) -> list[tuple[int, str, int]]:
        """The stripe's k + m cells in codec order: (node, "data" or "parity", chunk or cell index)."""
        data = [(self.member(stripe, i), "data", i) for i in range(self.k)]
        return data + [(self.holder(stripe, j), "parity", j) for j in range(self.m)]


def node_keys_to_topology(keys: Sequence[str], rank: int, parity: int | None) -> Topology:
    """This rank's Topology from every rank's node key (ranks with one key share a keeper).

    parity: m, or None for the default (1 when there are at least two nodes, else 0)."""
    nodes: dict[str, list[int]] = {}
    for r, key in enumerate(keys):
        nodes.setdefault(key, []).append(r)
    per_node = {len(v) for v in nodes.values()}
    if len(per_node) != 1:
        counts = {key: len(v) for key, v in nodes.items()}
        raise TopologyError(
            f"snapshot parity needs the same number of ranks on every node; ranks per keeper: {counts}"
        )
    order = list(nodes.values())  # nodes in the order of their first rank
    local = next(v.index(rank) for v in order if rank in v)
    group = tuple(v[local] for v in order)
    count = len(order)
    m = min(1, count - 1) if parity is None else parity
    if m < 0:
        raise TopologyError(f"snapshot parity = {m}: must be >= 0")
    if m >= count:
        raise TopologyError(
            f"snapshot parity = {m} needs at least {m + 1} nodes (each with its own keeper); "
            f"this job has {count}"
        )
    return Topology(rank=rank, world=len(keys), group=group, node=group.index(rank), m=m)
