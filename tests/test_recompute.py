"""The recompute-or-offload cost model and choice (offload/plan/recompute.py): pure arithmetic,
checked on hand-made costs."""

from __future__ import annotations

import pytest

from offload.plan.recompute import BlockCost, Link, choose, step_time

GB = 10**9


def blocks(n: int, fwd: float = 0.01, saved: int = GB // 10) -> list[BlockCost]:
    return [BlockCost(forward_s=fwd, backward_s=2 * fwd, saved_bytes=saved) for _ in range(n)]


def test_a_fast_link_offloads_every_block() -> None:
    costs = blocks(8)
    c = choose(costs, Link(100 * GB, 100 * GB))
    assert c.offload == (True,) * 8
    assert c.step_s == pytest.approx(8 * 0.01 + 8 * 0.02)  # no recompute left
    assert c.recompute_step_s == pytest.approx(8 * 0.01 + 8 * 0.03)
    assert c.offloaded_bytes == 8 * GB // 10


def test_a_slow_link_recomputes_every_block() -> None:
    c = choose(blocks(8), Link(1 * GB, 1 * GB))  # 0.1 s to move a block that recomputes in 0.01 s
    assert c.offload == (False,) * 8
    assert c.describe().startswith("recompute every block")


def test_offloads_until_the_link_is_as_busy_as_compute() -> None:
    # Forward compute 0.08 s; the link moves 0.1 GB in 0.02 s: 4 blocks fill the forward.
    costs = blocks(8)
    link = Link(5 * GB, 5 * GB)
    c = choose(costs, link)
    assert sum(c.offload) == 4
    assert c.offload[:4] == (True,) * 4  # the earliest blocks: the most time to hide their copies
    assert c.step_s == min(step_time(costs, link, [i < k for i in range(8)]) for k in range(9))
    assert "offload blocks 0-3, recompute the other 4" in c.describe()


def test_other_traffic_leaves_less_room() -> None:
    costs = blocks(8)
    busy = Link(5 * GB, 5 * GB, h2d_backward=GB // 2, d2h_forward=GB // 5)
    assert sum(choose(costs, busy).offload) < sum(choose(costs, Link(5 * GB, 5 * GB)).offload)


def test_the_best_compute_per_byte_goes_first() -> None:
    costs = [BlockCost(0.01, 0.02, GB // 10), BlockCost(0.05, 0.1, GB // 10), BlockCost(0.01, 0.02, GB)]
    c = choose(costs, Link(5 * GB, 5 * GB), host_bytes=GB // 10)
    assert c.offload == (False, True, False)  # the host budget has room for one: the best one


def test_a_block_that_saves_nothing_is_offloaded() -> None:
    c = choose([BlockCost(0.01, 0.02, 0)], Link(1, 1))
    assert c.offload == (True,)


def test_link_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="link rates must be > 0 bytes/s, got 0, 1"):
        Link(0, 1)
