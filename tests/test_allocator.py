"""Tests for offload.memory.allocator: the free list alone, by example and by property."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from offload.memory.allocator import ALIGNMENT, Block, FitPolicy, FreeListAllocator, align_up

PAGE = ALIGNMENT


def test_align_up_rounds_to_the_alignment():
    assert [align_up(n) for n in (1, 4095, 4096, 4097)] == [4096, 4096, 4096, 8192]


def test_allocations_are_aligned_and_rounded_up():
    alloc = FreeListAllocator(16 * PAGE)
    offsets = [alloc.allocate(n) for n in (1, PAGE + 1, 3)]
    assert offsets == [0, PAGE, 3 * PAGE]
    assert alloc.used_bytes == 4 * PAGE


def test_returns_none_when_nothing_fits():
    alloc = FreeListAllocator(4 * PAGE)
    assert alloc.allocate(4 * PAGE) == 0
    assert alloc.allocate(1) is None


def test_free_coalesces_with_both_neighbours():
    alloc = FreeListAllocator(4 * PAGE)
    a, b, c, d = (alloc.allocate(PAGE) for _ in range(4))
    alloc.free(a)
    alloc.free(c)
    assert alloc.free_blocks() == [Block(0, PAGE), Block(2 * PAGE, PAGE)]
    alloc.free(b)
    assert alloc.free_blocks() == [Block(0, 3 * PAGE)]
    alloc.free(d)
    assert alloc.free_blocks() == [Block(0, 4 * PAGE)]


@pytest.mark.parametrize(("policy", "expected_page"), [(FitPolicy.BEST, 5), (FitPolicy.FIRST, 0)])
def test_best_fit_takes_the_smallest_hole_and_first_fit_the_lowest(policy, expected_page):
    alloc = FreeListAllocator(8 * PAGE, policy=policy)
    offsets = [alloc.allocate(n * PAGE) for n in (3, 1, 1, 1, 2)]  # pages 0-2, 3, 4, 5, 6-7
    alloc.free(offsets[0])  # a 3-page hole at page 0
    alloc.free(offsets[3])  # a 1-page hole at page 5
    assert alloc.allocate(PAGE) == expected_page * PAGE


def test_fragmentation_is_one_minus_largest_over_total_free():
    alloc = FreeListAllocator(4 * PAGE)
    assert alloc.fragmentation() == 0.0
    a, _b, c, _d = (alloc.allocate(PAGE) for _ in range(4))
    assert alloc.fragmentation() == 0.0  # nothing free
    alloc.free(a)
    alloc.free(c)
    assert alloc.fragmentation() == pytest.approx(0.5)


def test_double_free_and_unknown_offset_raise():
    alloc = FreeListAllocator(4 * PAGE)
    offset = alloc.allocate(PAGE)
    alloc.free(offset)
    with pytest.raises(ValueError, match=r"offset 0 is not an allocated block"):
        alloc.free(offset)
    with pytest.raises(ValueError, match=r"offset 123 is not an allocated block"):
        alloc.free(123)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, r"size must be a positive multiple of alignment 4096, got 0"),
        ({"size": 5000}, r"size must be a positive multiple of alignment 4096, got 5000"),
        ({"size": 4096, "alignment": 3000}, r"alignment must be a positive power of two, got 3000"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreeListAllocator(**kwargs)


def test_non_positive_request_is_refused():
    with pytest.raises(ValueError, match=r"nbytes must be positive, got 0"):
        FreeListAllocator(PAGE).allocate(0)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free sequences against the free-list invariants."""

    @initialize(pages=st.integers(1, 64), policy=st.sampled_from(list(FitPolicy)))
    def setup(self, pages, policy):
        self.alloc = FreeListAllocator(pages * PAGE, policy=policy)
        self.live: dict[int, int] = {}

    @rule(nbytes=st.integers(1, 16 * PAGE))
    def allocate(self, nbytes):
        fits = self.alloc.largest_free >= align_up(nbytes)
        offset = self.alloc.allocate(nbytes)
        # A request fails only when no single free block is large enough.
        assert (offset is not None) == fits
        if offset is not None:
            self.live[offset] = nbytes

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        offset = data.draw(st.sampled_from(sorted(self.live)))
        assert self.alloc.free(offset) == align_up(self.live.pop(offset))

    @invariant()
    def blocks_are_aligned_in_bounds_and_disjoint(self):
        used = sorted((o, o + align_up(n)) for o, n in self.live.items())
        free = [(b.offset, b.end) for b in self.alloc.free_blocks()]
        spans = sorted(used + free)
        assert all(start % PAGE == 0 and end % PAGE == 0 for start, end in spans)
        # Used and free spans tile the arena exactly: no overlap, no gap, nothing out of bounds.
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]]
        assert spans[-1][1] == self.alloc.size

    @invariant()
    def free_blocks_are_coalesced(self):
        blocks = self.alloc.free_blocks()
        assert all(a.end < b.offset for a, b in itertools.pairwise(blocks))

    def teardown(self):
        for offset in list(self.live):
            self.alloc.free(offset)
        assert self.alloc.free_blocks() == [Block(0, self.alloc.size)]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


@given(sizes=st.lists(st.integers(1, 3 * PAGE), max_size=40), order=st.randoms())
def test_free_everything_in_any_order_leaves_one_block(sizes, order):
    alloc = FreeListAllocator(64 * PAGE)
    offsets = [o for o in (alloc.allocate(n) for n in sizes) if o is not None]
    order.shuffle(offsets)
    for offset in offsets:
        alloc.free(offset)
    assert alloc.free_blocks() == [Block(0, 64 * PAGE)]
