"""Tests for offload.memory.pool (and the arena/lease facade it hands out): leases, ledger, failures."""

from __future__ import annotations

import ctypes
import itertools
import subprocess
import sys
import threading

import pytest
import torch

from offload.memory import cuda
from offload.memory.allocator import ALIGNMENT
from offload.memory.arena import HostArena, LeaseError, page_size
from offload.memory.cuda import PinError
from offload.memory.pool import POISON, PinnedPool, PoolExhausted

KIB = 1024
PAGE = page_size()


@pytest.fixture
def pool():
    # pin=False: the same behaviour with or without a GPU; pinning has its own tests below.
    p = PinnedPool(64 * PAGE, arena_bytes=16 * PAGE, pin=False)
    yield p
    p.close(force=True)


def test_lease_is_returned_on_exit_and_reused(pool):
    with pool.lease(10_000, purpose="wire") as buf:
        first = buf.ptr
        assert pool.stats().in_use == 3 * ALIGNMENT
        assert pool.stats().requested == 10_000
    assert buf.released
    assert pool.stats().in_use == 0
    with pool.lease(10_000) as again:
        assert again.ptr == first


def test_every_lease_is_aligned_in_bounds_and_disjoint(pool):
    leases = [pool.lease(n) for n in (1, 4095, 4096, 4097, 10_000, 3, 20_000)]
    spans = sorted((lease.ptr, lease.ptr + lease.nbytes) for lease in leases)
    assert all(start % ALIGNMENT == 0 for start, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    for lease in leases:
        assert lease.arena.ptr <= lease.ptr and lease.ptr + lease.nbytes <= lease.arena.ptr + lease.arena.size
        lease.release()


def test_tensor_is_an_exact_view_whose_writes_land_in_the_arena(pool):
    with pool.lease(5000, purpose="wire") as buf:
        t = buf.tensor
        assert (t.dtype, t.device.type, t.numel()) == (torch.uint8, "cpu", 5000)
        assert t.data_ptr() == buf.ptr
        t.copy_(torch.arange(5000) % 251)
        assert ctypes.string_at(buf.ptr, 5000) == bytes(i % 251 for i in range(5000))
        buf.view(torch.float32, (10,)).fill_(1.5)
        assert ctypes.string_at(buf.ptr, 4) == torch.tensor([1.5]).numpy().tobytes()


def test_view_shapes_and_their_errors(pool):
    with pool.lease(4100) as buf:
        assert buf.view(torch.int32).shape == (1025,)
        assert buf.view(torch.bfloat16, (2, 3)).shape == (2, 3)
        with pytest.raises(ValueError, match=r"4100 bytes are not a whole number of torch.float64 elements"):
            buf.view(torch.float64)
        with pytest.raises(
            ValueError, match=r"shape \(1000, 2\) of torch.float32 needs 8000 bytes; the lease has 4100"
        ):
            buf.view(torch.float32, (1000, 2))


def test_exhaustion_raises_memory_error_showing_request_and_ledger():
    with PinnedPool(8 * PAGE, pin=False, name="tiny") as small:
        held = small.lease(6 * PAGE, purpose="adam_m")
        with pytest.raises(PoolExhausted) as info:
            small.lease(3 * PAGE, purpose="grads")
        assert isinstance(info.value, MemoryError)
        message = str(info.value)
        assert f"pool 'tiny' cannot lease 12 KiB ({3 * PAGE} bytes) for 'grads'" in message
        assert "adam_m" in message and "purpose" in message and "largest free 8 KiB" in message
        held.release()


def test_double_release_raises(pool):
    buf = pool.lease(100, purpose="wire")
    buf.release()
    with pytest.raises(
        LeaseError, match=r"Lease\('wire', 100 bytes, released, node=None\) cannot be released"
    ):
        buf.release()
    assert pool.stats().leases == 0


@pytest.mark.parametrize("use", [lambda b: b.tensor, lambda b: b.ptr, lambda b: b.view(torch.uint8)])
def test_use_after_release_raises(pool, use):
    with pool.lease(100, purpose="acts") as buf:
        use(buf)
    with pytest.raises(
        LeaseError, match=r"Lease\('acts', 100 bytes, released, node=None\)\.\w+ used after release"
    ):
        use(buf)


def test_ledger_counts_per_purpose_and_keeps_peaks(pool):
    wire = [pool.lease(ALIGNMENT, purpose="wire") for _ in range(3)]
    m = pool.lease(2 * ALIGNMENT + 1, purpose="adam_m")
    for lease in wire[:2]:
        lease.release()
    s = pool.stats()
    assert (s.in_use, s.peak_in_use, s.leases, s.total_leases) == (4 * ALIGNMENT, 6 * ALIGNMENT, 2, 4)
    assert s.by_purpose["wire"].in_use == ALIGNMENT
    assert s.by_purpose["wire"].peak == 3 * ALIGNMENT
    assert (s.by_purpose["wire"].leases, s.by_purpose["wire"].total_leases) == (1, 3)
    assert (s.by_purpose["adam_m"].in_use, s.by_purpose["adam_m"].requested) == (
        3 * ALIGNMENT,
        2 * ALIGNMENT + 1,
    )
    assert s.by_node[None].in_use == 4 * ALIGNMENT and s.by_node[None].reserved == 16 * PAGE
    report = pool.report()
    assert "wire" in report and "adam_m" in report and "peak 24 KiB" in report
    m.release()
    wire[2].release()


def test_fragmentation_on_a_constructed_case():
    with PinnedPool(10 * ALIGNMENT, pin=False) as p:
        a, b, c = (p.lease(ALIGNMENT) for _ in range(3))
        d = p.lease(p.stats().free)  # the rest of the single arena
        assert p.stats().fragmentation == 0.0  # nothing free
        a.release()
        c.release()
        assert p.stats().fragmentation == pytest.approx(0.5)  # two 1-page holes
        d.release()  # c and d coalesce: holes of 1 and 8 pages
        assert p.stats().fragmentation == pytest.approx(1 - 8 / 9)
        b.release()
        assert p.stats().fragmentation == 0.0


def test_arenas_are_mapped_lazily_up_to_capacity():
    with PinnedPool(40 * PAGE, arena_bytes=16 * PAGE, pin=False) as p:
        assert p.stats().reserved == 0
        leases = [p.lease(16 * PAGE) for _ in range(2)]
        assert (p.stats().reserved, p.stats().arenas) == (32 * PAGE, 2)
        leases.append(p.lease(8 * PAGE))  # the last arena is what capacity leaves: 8 pages
        assert (p.stats().reserved, p.stats().arenas) == (40 * PAGE, 3)
        with pytest.raises(PoolExhausted):
            p.lease(1)
        for lease in leases:
            lease.release()


def test_lease_larger_than_an_arena_gets_its_own_exact_arena_and_keeps_it():
    with PinnedPool(64 * PAGE, arena_bytes=8 * PAGE, pin=False) as p:
        big = p.lease(20 * PAGE + 1)
        assert (p.stats().reserved, big.arena.size) == (21 * PAGE, 21 * PAGE)
        big.release()
        again = p.lease(20 * PAGE)  # reuses the dedicated arena rather than mapping another
        assert again.arena is big.arena and p.stats().reserved == 21 * PAGE
        with pytest.raises(PoolExhausted, match=r"cannot lease"):
            p.lease(50 * PAGE)  # 21 + 50 pages > capacity
        again.release()


def test_close_with_outstanding_leases_names_them_and_force_revokes():
    p = PinnedPool(16 * PAGE, pin=False)
    buf = p.lease(300, purpose="boundary")
    with pytest.raises(LeaseError, match=r"1 lease\(s\) outstanding: Lease\('boundary', 300 bytes"):
        p.close()
    assert not p.closed
    p.close(force=True)
    assert p.closed and p.stats().reserved == 0 and p.stats().in_use == 0
    with pytest.raises(LeaseError, match=r"used after its pool was closed with force=True"):
        _ = buf.tensor
    with pytest.raises(LeaseError, match=r"cannot be released"):
        buf.release()
    with pytest.raises(LeaseError, match=r"pool 'host' is closed"):
        p.lease(1)
    p.close()  # a second close does nothing


def test_context_manager_closes_and_keeps_the_real_error():
    with pytest.raises(KeyError, match="boom"), PinnedPool(16 * PAGE, pin=False) as p:
        p.lease(10)
        raise KeyError("boom")
    assert p.closed


def test_poison_fills_released_bytes():
    with PinnedPool(16 * PAGE, pin=False, poison=True) as p:
        buf = p.lease(100)
        stale = buf.tensor
        stale.fill_(7)
        buf.release()
        assert bool((stale == POISON).all())


class FakeEngine:
    """Records registrations the way an I/O engine with registered buffers would see them."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.fail_on = fail_on

    def register(self, ptr: int, nbytes: int) -> None:
        if len(self.calls) == self.fail_on:
            raise OSError(12, "engine refused the buffer")
        self.calls.append(("register", ptr))
        self.registered[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        self.calls.append(("unregister", ptr))
        del self.registered[ptr]


def test_attach_io_registers_existing_and_future_arenas_and_unregisters_on_close():
    engine = FakeEngine()
    p = PinnedPool(32 * PAGE, arena_bytes=16 * PAGE, pin=False)
    first = p.lease(16 * PAGE)
    p.attach_io(engine)
    assert engine.registered == {first.arena.ptr: 16 * PAGE}
    second = p.lease(PAGE)  # maps a second arena
    assert engine.registered == {first.arena.ptr: 16 * PAGE, second.arena.ptr: 16 * PAGE}
    first.release()
    second.release()
    p.close()
    assert engine.registered == {} and [c for c, _ in engine.calls].count("unregister") == 2


def test_arenas_mapped_for_io_use_base_pages():
    """io_uring's accounting of registered huge pages slows with the memory already registered
    (offload/memory/pool.py, attach_io): arenas mapped while an engine is attached do not ask
    for them; once detached, the pool asks again."""
    p = PinnedPool(48 * PAGE, arena_bytes=16 * PAGE, pin=False, hugepages=True)
    engine = FakeEngine()
    p.attach_io(engine)
    io = p.lease(16 * PAGE)
    assert not io.arena.hugepages
    p.detach_io(engine)
    later = p.lease(16 * PAGE)
    probe = HostArena(16 * PAGE, node=None, hugepages=True, pin=False)  # whether the kernel takes the request
    assert later.arena.hugepages == probe.hugepages
    probe.close()
    io.release()
    later.release()
    p.close()


def test_engine_refusing_a_new_arena_fails_the_lease_and_unmaps_it():
    with PinnedPool(32 * PAGE, arena_bytes=16 * PAGE, pin=False) as p:
        p.attach_io(FakeEngine(fail_on=0))
        with pytest.raises(OSError, match="engine refused the buffer"):
            p.lease(PAGE)
        assert (p.stats().reserved, p.stats().arenas, p.stats().leases) == (0, 0, 0)


def test_attach_io_failure_rolls_back_and_detach_unregisters():
    with PinnedPool(32 * PAGE, arena_bytes=16 * PAGE, pin=False) as p:
        leases = [p.lease(16 * PAGE), p.lease(16 * PAGE)]
        failing = FakeEngine(fail_on=1)
        with pytest.raises(OSError):
            p.attach_io(failing)
        assert failing.registered == {}
        engine = FakeEngine()
        p.attach_io(engine)
        p.detach_io(engine)
        assert engine.registered == {}
        with pytest.raises(ValueError, match=r"is not attached to pool 'host'"):
            p.detach_io(engine)
        for lease in leases:
            lease.release()


def test_leases_from_many_threads_never_overlap(pool):
    errors: list[BaseException] = []

    def worker(tag: int) -> None:
        try:
            for n in range(50):
                with pool.lease(ALIGNMENT * (1 + n % 3), purpose=f"t{tag}") as buf:
                    buf.tensor.fill_(tag)
                    # Another thread's lease overlapping this one would overwrite the tag.
                    assert bool((buf.tensor == tag).all())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = pool.stats()
    assert (s.in_use, s.leases, s.total_leases) == (0, 0, 400)


def test_pin_true_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda, "cuda_available", lambda: False)
    with pytest.raises(PinError, match=r"pin=True needs CUDA, but .*; use pin='auto' or pin=False"):
        PinnedPool(16 * PAGE, pin=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_pin_true_on_this_cuda_less_machine_is_refused():
    with pytest.raises(PinError, match=r"pin=True needs CUDA"):
        PinnedPool(16 * PAGE, pin=True)


def test_pin_auto_follows_cuda_and_false_never_pins():
    with PinnedPool(16 * PAGE) as auto, PinnedPool(16 * PAGE, pin=False) as off:
        assert auto.pinned == torch.cuda.is_available()
        assert not off.pinned
        with off.lease(10) as buf:
            assert not buf.tensor.is_pinned()


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA calls recorded instead of made, so the pinning paths run on any machine."""
    calls: list[tuple] = []
    monkeypatch.setattr(cuda, "cuda_available", lambda: True)
    monkeypatch.setattr(cuda, "host_register", lambda ptr, n: calls.append(("register", ptr, n)))
    monkeypatch.setattr(cuda, "host_unregister", lambda ptr: calls.append(("unregister", ptr)))
    return calls


def test_arenas_are_registered_at_their_exact_size_and_unregistered_before_unmap(fake_cuda):
    p = PinnedPool(64 * PAGE, arena_bytes=24 * PAGE, pin=True)
    with p.lease(1) as a, p.lease(30 * PAGE) as big:
        arenas = [a.arena, big.arena]
        small_ptr, big_ptr = a.arena.ptr, big.arena.ptr
    p.close()
    assert fake_cuda == [
        ("register", small_ptr, 24 * PAGE),
        ("register", big_ptr, 30 * PAGE),  # no rounding to a power of two
        ("unregister", small_ptr),
        ("unregister", big_ptr),
    ]
    assert all(arena.closed for arena in arenas)


def test_cuda_refusing_registration_fails_the_lease_and_unmaps(fake_cuda, monkeypatch):
    def refuse(ptr: int, nbytes: int) -> None:
        raise PinError(f"cudaHostRegister({ptr:#x}, {nbytes}) failed: out of memory (cudaError 2)")

    monkeypatch.setattr(cuda, "host_register", refuse)
    with PinnedPool(16 * PAGE, pin=True) as p:
        with pytest.raises(PinError, match=r"cudaHostRegister\(0x[0-9a-f]+, 65536\) failed: out of memory"):
            p.lease(1)
        assert (p.stats().reserved, p.stats().arenas) == (0, 0)


def test_close_reports_an_unregister_failure_and_still_unmaps(fake_cuda, monkeypatch):
    def refuse(ptr: int) -> None:
        raise PinError(f"cudaHostUnregister({ptr:#x}) failed: invalid argument (cudaError 1)")

    p = PinnedPool(16 * PAGE, pin=True)
    with p.lease(1) as buf:
        arena = buf.arena
    monkeypatch.setattr(cuda, "host_unregister", refuse)
    with pytest.raises(RuntimeError, match=r"closing pool 'host': 1 error\(s\).*cudaHostUnregister"):
        p.close()
    assert p.closed and arena.closed and p.stats().reserved == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_lease_is_pinned_and_copies_asynchronously_to_the_gpu():
    with PinnedPool(1 << 20, pin=True) as p, p.lease(4096 * 4 + 12, purpose="wire") as buf:
        assert p.pinned and buf.arena.pinned and buf.tensor.is_pinned()
        host = buf.view(torch.float32)
        host.copy_(torch.arange(host.numel(), dtype=torch.float32))
        gpu = host.to("cuda", non_blocking=True)
        # The copy is asynchronous from pinned memory: wait for it before reading the result or
        # giving the lease back (release would let another lease overwrite bytes still being read).
        torch.cuda.current_stream().synchronize()
        torch.testing.assert_close(gpu.cpu(), host, rtol=0, atol=0)  # a copy: bit-exact


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 100}, r"capacity must be at least one page"),
        (
            {"capacity": "1MiB", "arena_bytes": "2MiB"},
            r"arena_bytes must be in \(0, capacity=1048576\], got 2097152",
        ),
        ({"capacity": "1MiB", "pin": "yes"}, r"pin must be True, False or 'auto', got 'yes'"),
        ({"capacity": "1MiB", "numa_node": -2}, r"numa_node must be a node id >= 0 or None, got -2"),
        ({"capacity": "lots"}, r"capacity: invalid size 'lots'"),
        (
            {"capacity": "1MiB", "arena_bytes": "1.5B"},
            r"arena_bytes: invalid size '1.5B': not a whole number",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PinnedPool(**kwargs)


@pytest.mark.parametrize("nbytes", [0, -1, 1.5, True])
def test_bad_lease_size_is_refused(pool, nbytes):
    with pytest.raises(ValueError, match=r"nbytes must be a positive int"):
        pool.lease(nbytes)


def test_capacity_may_be_written_with_units():
    with PinnedPool("1MiB", arena_bytes="256KiB", pin=False) as p:
        assert (p.config.capacity, p.config.arena_unit) == (1 << 20, 256 * KIB)


def test_import_is_lean():
    # Only what offload.memory itself adds is checked: torch must not be newly imported by it.
    code = (
        "import sys, threading, offload; had_torch = 'torch' in sys.modules; import offload.memory; "
        "assert had_torch or 'torch' not in sys.modules, 'offload.memory imported torch'; "
        "assert threading.active_count() == 1, 'offload.memory started a thread'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dropped_arena_is_unmapped_and_views_keep_it_alive() -> None:
    import gc

    arena = HostArena(1 << 20, node=None, hugepages=False, pin=False)
    raw = arena._raw
    view = arena.tensor(0, 4096)
    view.fill_(7)
    del arena
    gc.collect()
    assert not raw.closed  # the tensor still holds the mapping
    assert int(view.sum()) == 7 * 4096
    del view
    gc.collect()
    assert raw.closed  # nothing holds it: the finalizer unmapped it


def test_closed_arena_is_not_released_twice() -> None:
    arena = HostArena(1 << 16, node=None, hugepages=False, pin=False)
    arena.close()
    arena.close()
    assert arena.closed and not arena.pinned


@pytest.mark.parametrize("hugepages", [False, True])
def test_arenas_are_resident_when_mapped(hugepages: bool) -> None:
    """Every page of a new arena is faulted in at once (the kernel's populate advice, or a touch
    per page where it is refused): the ledger's bytes are resident, and no page fault lands on
    the hot path."""
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    arena = HostArena(64 << 20, node=None, hugepages=hugepages, pin=False)
    grew = proc.memory_info().rss - before
    arena.close()
    assert grew >= 0.9 * (64 << 20)
