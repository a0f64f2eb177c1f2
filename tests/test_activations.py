"""Boundary-state stores (offload/engine/activations*.py) and the packing they use, on the CPU:
each tier gives back exactly what was put (values, shape, stride, dtype, shared storages), frees
its host memory and files, and refuses what it cannot do with a message naming the cause."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from offload.config import ConfigError, Tier
from offload.engine.activations import DeviceStore, HostStore, OffloadingStore, make_store
from offload.engine.activations_nvme import NvmeStore
from offload.engine.device import Device
from offload.engine.packing import Packing

CPU = Device("cpu")


def group(seed: int) -> list[torch.Tensor]:
    """Tensors of several dtypes and layouts, as a block's inputs might be."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=g)
    big = torch.randn(4096, generator=g)
    return [
        torch.randn(5, 7, generator=g),  # plain
        torch.randn(7, 5, generator=g).t(),  # transposed (dense, not contiguous)
        torch.randint(0, 1000, (3, 4), generator=g, dtype=torch.int64),
        torch.randn(12, generator=g).to(torch.bfloat16)[::3],  # strided
        big[100:103],  # a small slice of a large storage: moved on its own
        torch.empty(0, 3),
        base,
        base[2:4, 1:],  # a view of base: moved with it, comes back a view of it
        torch.rand(9, generator=g) > 0.5,
    ]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        assert (x.shape, x.stride(), x.dtype) == (y.shape, y.stride(), y.dtype), i
        assert torch.equal(x, y), i
    # Views of one storage come back as views of one storage.
    assert got[7].untyped_storage().data_ptr() == got[6].untyped_storage().data_ptr()
    assert got[7].data_ptr() - got[6].data_ptr() == want[7].data_ptr() - want[6].data_ptr()


@pytest.fixture(params=["gpu", "host", "nvme"])
def store(request: pytest.FixtureRequest, disk_dir: Path) -> Iterator[OffloadingStore | DeviceStore]:
    tier = Tier(request.param)
    s = make_store(tier, CPU, blocks=8, nvme_dirs=[str(disk_dir)])
    yield s
    s.close()


def test_round_trip_in_backward_order(store: OffloadingStore | DeviceStore) -> None:
    # More groups than the NVMe tier's staging leases: the early ones really come from disk.
    handles = [store.put(i, group(i)) for i in range(8)]
    for i in reversed(range(8)):
        assert_same(store.get(handles[i]), group(i))


def test_prefetch_then_get_in_any_order(store: OffloadingStore | DeviceStore) -> None:
    handles = [store.put(i, group(i)) for i in range(7)]
    for i in (0, 3, 5):
        store.prefetch(handles[i])
    for i in (3, 0, 6, 1, 5, 2, 4):
        assert_same(store.get(handles[i]), group(i))


def test_a_group_is_fetched_once(store: OffloadingStore | DeviceStore) -> None:
    if isinstance(store, DeviceStore):
        pytest.skip("the device tier keeps references: fetching twice is harmless")
    handles = [store.put(i, group(i)) for i in range(2)]
    store.get(handles[0])
    with pytest.raises(RuntimeError, match="block 0's boundary state was already fetched"):
        store.get(handles[0])


def test_shared_inputs_stay_on_the_device() -> None:
    """A tensor handed to consecutive blocks (rotary tables) is not copied; the last group put
    comes back without a round trip."""
    s = HostStore(CPU, blocks=3)
    table = torch.randn(16, 4)
    inputs = [[torch.randn(16, 8), table] for _ in range(3)]
    handles = [s.put(i, x) for i, x in enumerate(inputs)]
    assert handles[0].packing is not None and len(handles[0].packing.placed) == 2
    assert handles[1].kept == {1: table}  # the table: kept by reference from the second block on
    last = s.get(handles[2])
    assert last[0] is inputs[2][0]  # still on the device when backward starts with it
    middle = s.get(handles[1])
    assert middle[1] is table and middle[0] is not inputs[1][0] and torch.equal(middle[0], inputs[1][0])
    s.get(handles[0])
    s.close()


def test_host_leases_go_back_to_the_pool() -> None:
    s = HostStore(CPU, blocks=4)
    handles = [s.put(i, group(i)) for i in range(4)]
    assert s.pool is not None and s.pool.stats().in_use > 0
    assert s.stored_bytes() == sum(h.packing.nbytes for h in handles if h.packing)
    for h in reversed(handles):
        s.get(h)
    s.put(9, group(9))  # reaps what the gets retired
    assert s.pool.stats().leases == 1  # the new group's
    s.close()


def test_a_handle_dropped_without_get_frees_its_lease() -> None:
    """A forward whose graph is thrown away (no backward) leaves nothing behind."""
    s = HostStore(CPU, blocks=2)
    s.put(0, group(0))
    s.put(1, group(1))  # the first handle is gone already: only the second is held (as the last)
    gc.collect()
    s.put(2, group(2))
    assert s.pool is not None
    assert s.pool.stats().leases == 2  # the second's and the third's
    s.close()


def test_nvme_writes_to_disk_and_removes_its_files(disk_dir: Path) -> None:
    s = NvmeStore(CPU, blocks=8, dirs=[str(disk_dir)], staging=4)
    handles = [s.put(i, group(i)) for i in range(8)]
    (path,) = s.paths()
    assert path.parent.parent == disk_dir and path.stat().st_size >= s.stored_bytes() > 0
    assert s.stored_bytes() % 4096 == 0  # each group padded to O_DIRECT's alignment
    early = handles[0]
    assert early.home.lease is None and early.home.region is not None  # only on disk now
    for i in reversed(range(8)):
        assert_same(s.get(handles[i]), group(i))
    s.close()
    assert not path.exists() and not path.parent.exists()


def test_nvme_files_go_with_the_store(disk_dir: Path) -> None:
    s = NvmeStore(CPU, blocks=2, dirs=[str(disk_dir)])
    s.put(0, group(0))
    (path,) = s.paths()
    assert path.exists()
    del s
    gc.collect()
    assert not path.parent.exists()


def test_nvme_space_is_reused_step_after_step(disk_dir: Path) -> None:
    s = NvmeStore(CPU, blocks=6, dirs=[str(disk_dir)])
    for step in range(3):
        handles = [s.put(i, group(i + step)) for i in range(6)]
        size = s.stored_bytes()
        for i in reversed(range(6)):
            assert_same(s.get(handles[i]), group(i + step))
        del handles
    assert s.stored_bytes() == size
    s.close()


def test_nvme_groups_are_striped_over_the_directories(disk_dir: Path) -> None:
    dirs = [disk_dir / "a", disk_dir / "b"]
    s = NvmeStore(CPU, blocks=4, dirs=[str(d) for d in dirs])
    handles = [s.put(i, group(i)) for i in range(4)]
    assert [p.parent.parent for p in s.paths()] == dirs
    assert all(p.stat().st_size > 0 for p in s.paths())
    for i in reversed(range(4)):
        assert_same(s.get(handles[i]), group(i))
    s.close()


def test_nvme_directory_that_cannot_be_created() -> None:
    with pytest.raises(ConfigError, match=r"nvme_dirs\[0\] = '/nonexistent-offload/x': .* does not exist"):
        NvmeStore(CPU, blocks=2, dirs=["/nonexistent-offload/x"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_nvme_directory_that_is_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"nvme_dirs\[0\]"):
        NvmeStore(CPU, blocks=2, dirs=[str(locked)])


def test_nvme_directory_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"nvme_dirs\[0\] = '.*file'"):
        NvmeStore(CPU, blocks=2, dirs=[str(f)])


def test_nvme_staging_must_cover_the_window(disk_dir: Path) -> None:
    with pytest.raises(ValueError, match="staging = 2: needs at least depth \\+ 2 = 4 leases"):
        NvmeStore(CPU, blocks=2, dirs=[str(disk_dir)], staging=2)


def test_device_tier_refuses_inputs_changed_in_place() -> None:
    s = DeviceStore()
    x = torch.zeros(3)
    h = s.put(4, [x])
    x.add_(1)
    with pytest.raises(RuntimeError, match="input 0 of block 4 was modified in place after the block ran"):
        s.get(h)


def test_cxl_is_not_a_tier_for_activations() -> None:
    with pytest.raises(ConfigError, match=r"placement\.activations = 'cxl': not built for activations"):
        make_store(Tier.CXL, CPU, blocks=2)


def test_closed_store_refuses_work() -> None:
    s = HostStore(CPU, blocks=1)
    h = s.put(0, group(0))
    s.close()
    with pytest.raises(RuntimeError, match="the activations store is closed"):
        s.get(h)


# ---- packing -----------------------------------------------------------------------------------


def test_views_of_one_storage_move_once() -> None:
    x = torch.randn(64, 32)
    p = Packing([x, x.t(), x[3:9], x.view(-1)])
    assert len(p.pieces) == 1 and p.pieces[0].nbytes == x.numel() * 4
    buf = torch.empty(p.nbytes, dtype=torch.uint8)
    p.copy_out(buf)
    back = p.rebuild(buf)
    assert len({t.untyped_storage().data_ptr() for t in back}) == 1
    for got, want in zip(back, [x, x.t(), x[3:9], x.view(-1)]):
        assert got.stride() == want.stride() and torch.equal(got, want)


def test_a_small_slice_of_a_large_storage_moves_alone() -> None:
    big = torch.randn(1 << 16)
    p = Packing([big[10:20], big[500:510]])
    assert [piece.dense for piece in p.pieces] == [True, True]
    assert p.nbytes == 2 * 64  # two 40-byte pieces, each padded to 64


def test_rebuilt_tensors_keep_their_alignment() -> None:
    """Kernels see the same address modulo 64 as in forward (vectorised paths depend on it)."""
    x = torch.randn(100, dtype=torch.float64)
    views = [x[1:50], x[3:], x[8:90]]
    p = Packing(views)
    buf = torch.empty(p.nbytes, dtype=torch.uint8)
    p.copy_out(buf)
    for got, want in zip(p.rebuild(buf), views):
        assert got.data_ptr() % 64 == want.data_ptr() % 64


class _Copy:
    """A copy out that is in flight until waited for."""

    def __init__(self, log: list[int], index: int) -> None:
        self.log, self.index, self.landed = log, index, False

    def done(self) -> bool:
        return self.landed

    def wait(self) -> None:
        self.log.append(self.index)
        self.landed = True


def test_outstanding_copies_are_bounded() -> None:
    """With outstanding=1 a put first waits (on the host) for the copy before it, so groups
    whose device memory waits for their copy cannot pile up while the host runs ahead."""
    waited: list[int] = []

    class Slow(HostStore):
        def _copy_out(self, st):  # type: ignore[no-untyped-def]
            super()._copy_out(st)
            st.out = _Copy(waited, st.index)

    bounded, free = Slow(CPU, blocks=4, outstanding=1), Slow(CPU, blocks=4)
    for i in range(4):
        bounded.put(i, [torch.randn(64)])
        free.put(i, [torch.randn(64)])
    assert waited == [0, 1, 2]  # each put waited for the previous copy; the unbounded store none
    assert len(bounded._outgoing) == 1 and len(free._outgoing) == 4
    bounded.close()
    free.close()


class _Event:
    """A recorded event of the Recorder: done once ``landed``."""

    def __init__(self, name: str) -> None:
        self.name, self.landed = name, True

    def query(self) -> bool:
        return self.landed

    def synchronize(self) -> None:
        self.landed = True


class Recorder(Device):
    """The CPU device, logging the stream calls a CUDA device would get: what a store orders
    after what, checked without a GPU."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.log: list[tuple[str, str, str]] = []
        self.events: list[_Event] = []

    def compute_stream(self) -> str:
        return "compute"

    def event(self, stream: str) -> _Event:
        ev = _Event(f"{stream}{len(self.events)}")
        self.events.append(ev)
        self.log.append(("record", stream, ev.name))
        return ev

    def wait(self, stream: str, event: _Event | None) -> None:
        if event is not None:
            self.log.append(("wait", stream, event.name))


def recording_store() -> tuple[HostStore, Recorder]:
    dev = Recorder()
    store = HostStore(dev, blocks=4, depth=1, outstanding=1)
    store.d2h, store.h2d = "d2h", "h2d"
    return store, dev


def test_a_group_comes_back_after_the_compute_queued_before_it() -> None:
    """The buffer a group comes back into is allocated on the compute stream (so it may take
    the memory of the group compute has just finished with) and the copy into it waits for the
    compute queued so far; compute waits for the copy before reading it."""
    store, dev = recording_store()
    handles = [store.put(i, [torch.randn(64)]) for i in range(3)]
    out = handles[1].out.event.name  # its copy out
    store.get(handles[2])  # the last put: no round trip; group 1 starts coming back
    freed, back = dev.events[-2].name, dev.events[-1].name
    assert dev.log[-4:] == [
        ("record", "compute", freed),
        ("wait", "h2d", freed),
        ("wait", "h2d", out),
        ("record", "h2d", back),
    ]
    store.get(handles[1])
    assert ("wait", "compute", back) in dev.log
    store.close()


def test_a_group_dropped_while_coming_back_keeps_its_buffer_until_the_copy_lands() -> None:
    """The compute stream may reuse a freed buffer at once: one whose copy back is still in
    flight (a backward that failed) stays in its retired home until the copy is done."""
    store, dev = recording_store()
    handles = [store.put(i, [torch.randn(64)]) for i in range(3)]
    store.get(handles[2])  # group 1 starts coming back
    back = dev.events[-1]
    back.landed = False
    assert handles[1].home.incoming is not None
    home = handles[1].home
    del handles[1]
    gc.collect()
    store._reap()
    assert home in store._retired and home.incoming is not None
    back.landed = True
    store._reap()
    assert home.incoming is None and home not in store._retired
    store.close()


def test_the_previous_group_is_let_go_before_the_next_copy_is_queued() -> None:
    """On CUDA a moved tensor's memory is reusable once the d2h stream has passed the event the
    allocator records when it is freed: freed after the next copy is queued, it would wait for
    that copy too (one group more on the device)."""
    refs: list[weakref.ref] = []
    dead_at_copy: list[bool] = []

    class Check(HostStore):
        def _copy_out(self, st):  # type: ignore[no-untyped-def]
            dead_at_copy.append(all(r() is None for r in refs))
            super()._copy_out(st)

    store = Check(CPU, blocks=2, outstanding=1)
    first = [torch.randn(64)]
    refs.append(weakref.ref(first[0]))
    store.put(0, first)
    del first
    store.put(1, [torch.randn(64)])
    assert dead_at_copy == [False, True]
    store.close()


def _spaced_puts(s: HostStore, indices: list[int]) -> dict[int, tuple[object, list[torch.Tensor]]]:
    return {i: (s.put(i, g := group(i)), g) for i in indices}


def test_a_paced_store_brings_a_group_back_in_parts_one_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept graphs' store: nothing comes back when a group is got; each pace(index) queues
    the next group's remaining bytes over the blocks left before it, and the bytes are exact."""
    monkeypatch.setattr("offload.engine.activations.PACE_MIN_BYTES", 1)
    s = HostStore(CPU, blocks=8, depth=1, paced=True)
    puts = _spaced_puts(s, [0, 4, 7])
    st4 = puts[4][0]
    total = st4.packing.nbytes
    assert_same(s.get(puts[7][0]), puts[7][1])  # the last put: no round trip
    assert st4.sent == 0  # got says nothing; pace does
    sent = []
    for index in (7, 6, 5):
        s.pace(index)
        sent.append(st4.sent)
    third = -(-total // 3)
    assert sent == [third, third + -(-(total - third) // 2), total]
    assert puts[0][0].sent == 0  # one group ahead (depth 1): the next waits for this one's get
    assert_same(s.get(st4), puts[4][1])
    s.pace(4)
    assert puts[0][0].sent == -(-puts[0][0].packing.nbytes // 4)
    assert_same(s.get(puts[0][0]), puts[0][1])
    s.close()


def test_a_paced_group_got_before_its_parts_are_all_queued_comes_back_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("offload.engine.activations.PACE_MIN_BYTES", 1)
    s = HostStore(CPU, blocks=8, depth=1, paced=True)
    puts = _spaced_puts(s, [0, 6])
    s.get(puts[6][0])
    s.pace(6)  # a sixth of block 0's group queued, then backward skips ahead to it
    assert 0 < puts[0][0].sent < puts[0][0].packing.nbytes
    assert_same(s.get(puts[0][0]), puts[0][1])
    s.close()


def test_pacing_queues_whole_groups_below_the_smallest_part() -> None:
    s = HostStore(CPU, blocks=8, depth=1, paced=True)
    puts = _spaced_puts(s, [0, 4])
    s.get(puts[4][0])
    s.pace(4)  # the group is far below PACE_MIN_BYTES: all of it at once
    assert puts[0][0].sent == puts[0][0].packing.nbytes
    assert_same(s.get(puts[0][0]), puts[0][1])
    s.close()


def test_a_store_that_is_not_paced_brings_the_next_group_back_at_get() -> None:
    s = HostStore(CPU, blocks=8, depth=1)
    puts = _spaced_puts(s, [0, 4, 7])
    s.get(puts[7][0])
    assert puts[4][0].sent == puts[4][0].packing.nbytes  # whole, at once
    assert puts[0][0].sent == 0
    s.pace(7)  # a no-op here
    assert puts[0][0].sent == 0
    assert_same(s.get(puts[4][0]), puts[4][1])
    s.close()


def test_a_paced_part_waits_for_where_its_block_began(monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer is claimed when the group before is got (the copy waits for the compute queued
    by then, not for the block queued after), and each part waits for the event where its
    block's backward began, so it starts with the weight upload queued before it, not ahead of
    the device."""
    monkeypatch.setattr("offload.engine.activations.PACE_MIN_BYTES", 1)
    dev = Recorder()
    store = HostStore(dev, blocks=8, depth=1, outstanding=1, paced=True)
    store.d2h, store.h2d = "d2h", "h2d"
    handles = {i: store.put(i, [torch.randn(64)]) for i in (0, 3)}
    out = handles[0].out.event.name
    store.get(handles[3])  # claims block 0's buffer: nothing queued on h2d yet
    claimed = dev.events[-1].name
    assert dev.log[-1] == ("record", "compute", claimed)
    for index in (3, 2, 1):
        began = dev.event("compute")  # where block index's backward began
        store.pace(index, began)
        first = [("wait", "h2d", claimed), ("wait", "h2d", out)] if index == 3 else []
        assert dev.log[-2 - len(first) :] == [
            *first,
            ("wait", "h2d", began.name),
            ("record", "h2d", dev.events[-1].name),
        ]
    assert handles[0].sent == handles[0].packing.nbytes
    store.get(handles[0])
    assert ("wait", "compute", dev.events[-1].name) in dev.log  # compute reads it after the last part
    store.close()


def test_the_first_group_of_a_backward_is_claimed_first_and_paced_from_the_next_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No group before it was got, so its buffer is claimed at the first pace (after that
    block's backward was queued): its parts start at the next pace, two over blocks 2 and 1."""
    monkeypatch.setattr("offload.engine.activations.PACE_MIN_BYTES", 1)
    s = HostStore(CPU, blocks=8, depth=1, paced=True)
    puts = _spaced_puts(s, [0])
    st = puts[0][0]
    s.pace(3)
    assert st.buf is not None and st.sent == 0
    s.pace(2)
    assert st.sent == -(-st.packing.nbytes // 2)
    s.pace(1)
    assert st.sent == st.packing.nbytes
    assert_same(s.get(st), puts[0][1])
    s.close()


def test_a_backward_that_stops_between_parts_leaves_no_lease_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backward that fails after part of a group came back: dropping the handle frees its
    lease, and pace on a closed store does nothing."""
    monkeypatch.setattr("offload.engine.activations.PACE_MIN_BYTES", 1)
    s = HostStore(CPU, blocks=8, depth=1, paced=True)
    puts = _spaced_puts(s, [0, 4])
    s.get(puts[4][0])
    s.pace(4)
    st = puts[0][0]
    assert 0 < st.sent < st.packing.nbytes
    del puts, st
    gc.collect()
    s.put(9, group(9))  # reaps what was dropped
    assert s.pool is not None and s.pool.stats().leases == 1  # the new group's
    s.close()
    s.pace(3)  # closed: nothing to queue, no error
    assert s.pool.closed
