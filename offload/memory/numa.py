"""NUMA nodes of this machine and checks that an arena really lives on the node it was bound to.

CXL memory expanders show up as NUMA nodes with memory and no CPUs, so the node list is also how
CXL capacity is found. Binding itself happens in the C++ arena (mbind with MPOL_BIND before the
first touch); :func:`verify_binding` reads back the range's policy (get_mempolicy) and where its
pages actually are (move_pages), because a bind that silently fell back would only show up as
lost bandwidth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from offload.memory.arena import HostArena, Lease

SYSFS_NODES = Path("/sys/devices/system/node")
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
_MEMTOTAL = re.compile(r"MemTotal:\s+(\d+)\s*kB")


@dataclass(frozen=True, slots=True)
class NumaNode:
    """One NUMA node as the kernel describes it under /sys/devices/system/node."""

    id: int
    mem_total: int
    """Bytes of memory on the node (MemTotal)."""
    cpus: tuple[int, ...]
    """CPU ids on the node; empty for a memory-only node."""

    @property
    def has_cpus(self) -> bool:
        return bool(self.cpus)

    @property
    def is_cxl_candidate(self) -> bool:
        """Memory and no CPUs: how CXL memory expanders (and some HBM/PMEM) appear."""
        return self.mem_total > 0 and not self.cpus


@dataclass(frozen=True, slots=True)
class BindingReport:
    """What get_mempolicy and move_pages say about an arena that should be on ``node``."""

    node: int | None
    """The node the arena was bound to (None: not bound, nothing to verify)."""
    mode: int
    """Memory-policy mode of the range (MPOL_BIND is 2)."""
    policy_nodes: tuple[int, ...]
    """Nodes in the policy's node mask (nodes 0-63)."""
    page_nodes: tuple[int, ...]
    """Node of each sampled page; negative errno for a page that is not placed."""

    @property
    def ok(self) -> bool:
        if self.node is None:
            return True
        bound = self.mode == MPOL_BIND and self.node in self.policy_nodes
        return bound and bool(self.page_nodes) and all(n == self.node for n in self.page_nodes)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "NOT BOUND AS ASKED"
        return (
            f"binding to node {self.node}: {verdict} (policy mode {self.mode}, nodes {list(self.policy_nodes)}; "
            f"sampled pages on nodes {sorted(set(self.page_nodes))})"
        )


def list_nodes(root: Path = SYSFS_NODES) -> list[NumaNode]:
    """The NUMA nodes, by id; empty when the kernel exposes none (built without NUMA)."""
    if not root.is_dir():
        return []
    nodes = []
    for path in root.iterdir():
        match = re.fullmatch(r"node(\d+)", path.name)
        if match:
            nodes.append(_read_node(int(match.group(1)), path))
    return sorted(nodes, key=lambda n: n.id)


def check_node(node: int, root: Path = SYSFS_NODES) -> NumaNode:
    """The node ``node``, or ValueError naming it and the nodes that exist."""
    nodes = list_nodes(root)
    found = next((n for n in nodes if n.id == node), None)
    if found is None:
        have = [n.id for n in nodes] or "none (kernel without NUMA support?)"
        raise ValueError(f"NUMA node {node} does not exist; nodes on this machine: {have}")
    if found.mem_total <= 0:
        raise ValueError(f"NUMA node {node} has no memory to bind to")
    return found


def verify_binding(target: HostArena | Lease, max_pages: int = 64) -> BindingReport:
    """Checks the policy and sampled page placement of an arena, or of the arena holding a lease.

    Pages are sampled over the whole arena (the native query takes no sub-range); the pool faults
    every page in when it maps an arena, so each sample has a node.
    """
    arena = target if isinstance(target, HostArena) else target.arena
    mode, mask = arena.policy()
    return BindingReport(
        node=arena.node,
        mode=mode,
        policy_nodes=tuple(i for i in range(64) if mask >> i & 1),
        page_nodes=tuple(arena.page_nodes(max_pages)),
    )


def _read_node(node_id: int, path: Path) -> NumaNode:
    meminfo = (path / "meminfo").read_text() if (path / "meminfo").exists() else ""
    match = _MEMTOTAL.search(meminfo)
    cpulist = (path / "cpulist").read_text().strip() if (path / "cpulist").exists() else ""
    return NumaNode(
        id=node_id, mem_total=int(match.group(1)) * 1024 if match else 0, cpus=_parse_cpulist(cpulist)
    )


def _parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(cpus)
