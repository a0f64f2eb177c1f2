"""Tests for offload.memory.numa: node discovery, binding a pool to a node, and verifying it."""

from __future__ import annotations

import pytest

from offload.memory.arena import HostArena, page_size
from offload.memory.numa import (
    MPOL_BIND,
    SYSFS_NODES,
    BindingReport,
    NumaNode,
    check_node,
    list_nodes,
    verify_binding,
)
from offload.memory.pool import PinnedPool

PAGE = page_size()
needs_numa = pytest.mark.skipif(not (SYSFS_NODES / "node0").is_dir(), reason="kernel exposes no NUMA nodes")


def fake_sysfs(root, nodes):
    """A /sys/devices/system/node lookalike: {id: (MemTotal kB, cpulist)}."""
    for node_id, (kb, cpulist) in nodes.items():
        d = root / f"node{node_id}"
        d.mkdir(parents=True)
        (d / "meminfo").write_text(f"Node {node_id} MemTotal:       {kb} kB\nNode {node_id} MemFree: 1 kB\n")
        (d / "cpulist").write_text(cpulist + "\n")
    (root / "possible").write_text("0-7\n")  # not a node directory; must be ignored
    return root


def test_list_nodes_reads_memory_and_cpus_and_spots_cxl_candidates(tmp_path):
    root = fake_sysfs(tmp_path, {0: (1024, "0-3,8"), 2: (2048, ""), 1: (0, "4-7")})
    nodes = list_nodes(root)
    assert nodes == [
        NumaNode(id=0, mem_total=1024 * 1024, cpus=(0, 1, 2, 3, 8)),
        NumaNode(id=1, mem_total=0, cpus=(4, 5, 6, 7)),
        NumaNode(id=2, mem_total=2048 * 1024, cpus=()),
    ]
    assert [n.is_cxl_candidate for n in nodes] == [False, False, True]
    assert [n.has_cpus for n in nodes] == [True, True, False]


def test_list_nodes_is_empty_without_numa(tmp_path):
    assert list_nodes(tmp_path / "missing") == []


def test_check_node_names_the_bad_node_and_the_ones_that_exist(tmp_path):
    root = fake_sysfs(tmp_path, {0: (1024, "0"), 1: (0, "1")})
    assert check_node(0, root).id == 0
    with pytest.raises(ValueError, match=r"NUMA node 5 does not exist; nodes on this machine: \[0, 1\]"):
        check_node(5, root)
    with pytest.raises(ValueError, match=r"NUMA node 1 has no memory to bind to"):
        check_node(1, root)
    with pytest.raises(ValueError, match=r"NUMA node 0 does not exist; nodes on this machine: none"):
        check_node(0, tmp_path / "missing")


@needs_numa
def test_this_machine_has_node_zero_with_memory():
    node0 = next(n for n in list_nodes() if n.id == 0)
    assert node0.mem_total > 0


@needs_numa
def test_pool_bound_to_node_zero_places_every_page_there():
    with PinnedPool(64 * PAGE, arena_bytes=32 * PAGE, numa_node=0, pin=False) as pool:
        with pool.lease(20 * PAGE, purpose="adam_m") as buf:
            buf.tensor.fill_(0x5A)
            assert buf.node == 0
            report = verify_binding(buf)
            assert report.ok and bool(report)
            assert report.mode == MPOL_BIND and 0 in report.policy_nodes
            assert report.page_nodes and all(n == 0 for n in report.page_nodes)
            assert "binding to node 0: ok" in str(report)
        assert pool.stats().by_node[0].reserved == 32 * PAGE


@needs_numa
def test_binding_to_a_missing_node_is_a_clear_error():
    existing = [n.id for n in list_nodes()]
    missing = max(existing) + 1
    with pytest.raises(ValueError, match=rf"NUMA node {missing} does not exist; nodes on this machine: \[0"):
        PinnedPool(16 * PAGE, numa_node=missing, pin=False)


def test_unbound_arena_has_nothing_to_verify():
    arena = HostArena(4 * PAGE, node=None, hugepages=False, pin=False)
    try:
        report = verify_binding(arena)
        assert report.node is None and report.ok
    finally:
        arena.close()


def test_report_flags_pages_off_the_node():
    report = BindingReport(node=1, mode=MPOL_BIND, policy_nodes=(1,), page_nodes=(1, 0, 1))
    assert not report.ok
    assert "binding to node 1: NOT BOUND AS ASKED" in str(report)
    assert not BindingReport(node=1, mode=0, policy_nodes=(), page_nodes=(1,)).ok
    assert not BindingReport(node=1, mode=MPOL_BIND, policy_nodes=(1,), page_nodes=(-2,)).ok
