"""Where chunks and parity cells live (topology.py) and which step a restart can restore (survey.py):
pure logic, checked over every group size, parity and loss pattern up to m; and which step on disk
the ranks agree on when the memory is lost."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from offload.snapshot.survey import choose, choose_disk, lost, unseen, unseen_note
from offload.snapshot.topology import Topology, TopologyError, node_keys_to_topology


def topo(nodes: int, m: int, node: int = 0) -> Topology:
    return Topology(rank=node, world=nodes, group=tuple(range(nodes)), node=node, m=m)


@pytest.mark.parametrize(("nodes", "m"), [(g, m) for g in range(2, 8) for m in range(1, g)])
def test_every_stripe_spans_k_plus_m_distinct_nodes(nodes: int, m: int) -> None:
    t = topo(nodes, m)
    for stripe in range(nodes):
        holders = [node for node, _, _ in t.cells(stripe)]
        assert len(set(holders)) == t.k + m == nodes  # any m lost nodes take at most m cells
    for node in range(nodes):
        for i in range(t.k):  # chunk i of a node is member i of its stripe
            assert t.member(t.stripe_of_chunk(node, i), i) == node
        for j in range(m):  # cell j of a node is parity j of its stripe
            assert t.holder(t.stripe_of_cell(node, j), j) == node
    # Each node holds k chunks and m cells, one in each of the G stripes: memory (k + m) / k.
    for node in range(nodes):
        mine = [s for s in range(nodes) for n, _, _ in t.cells(s) if n == node]
        assert sorted(mine) == list(range(nodes))


def test_node_keys_make_coding_groups_of_the_same_local_rank() -> None:
    keys = ["a", "a", "b", "b", "c", "c"]  # 3 nodes of 2 ranks
    t = node_keys_to_topology(keys, rank=3, parity=None)
    assert (t.group, t.node, t.m, t.k) == ((1, 3, 5), 1, 1, 2)
    assert node_keys_to_topology(["a"], rank=0, parity=None).m == 0  # one node: no parity
    with pytest.raises(
        TopologyError, match=r"the same number of ranks on every node; ranks per keeper: \{'a': 2, 'b': 1\}"
    ):
        node_keys_to_topology(["a", "a", "b"], rank=0, parity=None)
    with pytest.raises(TopologyError, match=r"snapshot parity = 3 needs at least 4 nodes .* this job has 3"):
        node_keys_to_topology(["a", "b", "c"], rank=0, parity=3)


def statuses(nodes: int, m: int, step: int = 5, lost_nodes: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """What each rank reports after a snapshot of step committed everywhere, some nodes lost."""
    t = topo(nodes, m)
    out = []
    for r in range(nodes):
        slots = []
        if r not in lost_nodes:
            slots.append(
                {
                    "slot": 0,
                    "step": step,
                    "parity_step": step,
                    "chunk": 4096,
                    "k": t.k,
                    "good": list(range(t.k)),
                    "cells": list(range(m)),
                    "members": {str(t.stripe_of_cell(r, j)): [100 + i for i in range(t.k)] for j in range(m)},
                }
            )
        out.append({"rank": r, "group": list(range(nodes)), "seen": bool(slots), "slots": slots})
    return out


@pytest.mark.parametrize(("nodes", "m"), [(3, 1), (4, 2), (5, 2), (6, 3)])
def test_any_m_lost_nodes_are_rebuilt_and_m_plus_one_are_not(nodes: int, m: int) -> None:
    k = nodes - m
    for gone in itertools.chain.from_iterable(itertools.combinations(range(nodes), n) for n in range(m + 1)):
        plan = choose(statuses(nodes, m, lost_nodes=gone), m)
        assert plan is not None and plan.step == 5
        assert plan.rebuilt_ranks == sorted(gone)
        assert {r: s for r, s in plan.slots.items() if s is None} == dict.fromkeys(gone)
        for rb in plan.rebuild:
            assert len(rb.sources) == k and all(s.rank not in gone for s in rb.sources)
            assert rb.crc == 100 + rb.chunk
    for gone in itertools.combinations(range(nodes), m + 1):
        assert choose(statuses(nodes, m, lost_nodes=gone), m) is None
        assert lost(statuses(nodes, m, lost_nodes=gone)) == (5, list(gone))


def test_a_crash_mid_snapshot_restores_the_step_before() -> None:
    st = statuses(3, 1, step=4)
    newer = statuses(3, 1, step=5)
    for r in (0, 1):  # ranks 0 and 1 committed step 5 in their other slot; rank 2 died before
        st[r]["slots"].append({**newer[r]["slots"][0], "slot": 1, "parity_step": -1, "cells": []})
    plan = choose(st, 1)
    assert plan is not None and (plan.step, plan.rebuild) == (4, ())
    assert plan.slots == {0: 0, 1: 0, 2: 0}


def test_a_chunk_failing_its_crc_is_rebuilt_from_its_stripe() -> None:
    st = statuses(3, 1)
    st[1]["slots"][0]["good"] = [1]  # chunk 0 of rank 1 is corrupt
    plan = choose(st, 1)
    assert plan is not None and plan.slots[1] == 0
    assert [(rb.rank, rb.chunk) for rb in plan.rebuild] == [(1, 0)]
    assert lost(st) == (5, [1])


def disk(flushed: list[int], saved: list[int]) -> dict[str, Any]:
    return {"flushed": flushed, "saved": saved}


def test_the_disk_fallback_takes_the_newest_step_every_rank_can_load() -> None:
    # A flushed step counts once every rank has its file; a checkpoint once every rank sees it.
    assert choose_disk([disk([2, 4], []), disk([2, 4], []), disk([2], [])]) == ("flushed", 2)
    assert choose_disk([disk([], [3, 6]), disk([], [3, 6]), disk([], [3, 6])]) == ("checkpoint", 6)
    # The newer of the two kinds; a tie goes to the flushed snapshot (each rank's own state).
    assert choose_disk([disk([4], [6]), disk([4], [6])]) == ("checkpoint", 6)
    assert choose_disk([disk([6], [6]), disk([6], [6])]) == ("flushed", 6)
    assert choose_disk([disk([8], [6]), disk([8], [6])]) == ("flushed", 8)
    # Nothing every rank can load: None, whatever some ranks have.
    assert choose_disk([disk([2], [4]), disk([], []), disk([3], [4])]) is None
    assert choose_disk([disk([], [])]) is None


def test_checkpoints_not_every_rank_sees_are_named() -> None:
    # Rank 0 writes a multi-rank checkpoint; on a filesystem the others do not share, only it sees it.
    reports = [disk([], [2, 4]), disk([], [2]), disk([], [2])]
    reports[0]["paths"] = {"2": "ckpt/step_000002", "4": "ckpt/step_000004"}
    assert choose_disk(reports) == ("checkpoint", 2)
    assert unseen(reports) == {4: [1, 2]}
    assert unseen_note(reports, 2) == (
        " (the checkpoint ckpt/step_000004 is not seen by ranks [1, 2]: every rank loads it, so it must "
        "be on a filesystem all of them read)"
    )
    assert unseen_note(reports, None).startswith(" (the checkpoint ckpt/step_000004 is not seen")
    assert unseen_note(reports, 4) == ""  # nothing newer than what is loaded goes unseen
    assert unseen([disk([], [2]), disk([], [2])]) == {}
