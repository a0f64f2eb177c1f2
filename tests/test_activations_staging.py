"""The NVMe store's staging leases grow where the disk holds the forward back
(offload/engine/activations_nvme.py): by the share of the forward it waited, within the host room
it is given, and the groups still in their leases when backward begins are never read back."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from offload.engine.activations_nvme import STAGING, NvmeStore
from offload.engine.device import Device

CPU = Device("cpu")
GROUP = 64 << 10  # one group's bytes: 16K float32, a multiple of the 4096-byte alignment


class SlowFile:
    """A run file whose writes take ``delay`` seconds each, one after another (one drive)."""

    def __init__(self, file: Any, delay: float) -> None:
        self.file, self.delay, self.free_at = file, delay, 0.0

    def write_from(self, *args: Any) -> SlowWrite:
        self.free_at = max(self.free_at, time.perf_counter()) + self.delay
        return SlowWrite(self.file.write_from(*args), self.free_at)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class SlowWrite:
    def __init__(self, fut: Any, end: float) -> None:
        self.fut, self.end = fut, end

    def done(self) -> bool:
        return time.perf_counter() >= self.end and bool(self.fut.done())

    def wait(self) -> int:
        time.sleep(max(self.end - time.perf_counter(), 0.0))
        return int(self.fut.wait())


def groups(n: int) -> list[list[torch.Tensor]]:
    return [[torch.full((GROUP // 4,), float(i))] for i in range(n)]


def make(disk_dir: Path, room: int | None, delay: float = 0.0) -> NvmeStore:
    store = NvmeStore(CPU, 8, [str(disk_dir)], room=None if room is None else (lambda: room))
    if delay:
        for f in store._files:
            f.file = SlowFile(f.file, delay)  # type: ignore[assignment]
    return store


def one_pass(store: NvmeStore, n: int = 8) -> None:
    data = groups(n)
    handles = [store.put(i, g) for i, g in enumerate(data)]
    for i in reversed(range(n)):
        assert torch.equal(store.get(handles[i])[0], data[i][0])


def test_a_forward_held_back_by_the_disk_grows_the_leases_and_skips_the_reads(disk_dir: Path) -> None:
    store = make(disk_dir, room=1 << 40, delay=0.03)
    for _ in range(10):  # eight writes of 30 ms each against puts that take next to nothing
        one_pass(store)
        if store.staging >= 8:
            break
    assert store.staging == 8
    assert store.growth[0].startswith(f"staging {STAGING} -> ")
    assert "leases of 0.00 GiB: the forward waited" in store.growth[0]
    # With fast writes, the next pass's groups all stay in their leases: nothing is read back.
    for f in store._files:
        f.file = f.file.file  # type: ignore[attr-defined]
    store.clock.start()
    one_pass(store)
    written, read = store.clock.stop()
    assert written.nbytes == 8 * GROUP and read.nbytes == 0
    store.close()


def test_the_leases_grow_only_within_the_host_room(disk_dir: Path) -> None:
    store = make(disk_dir, room=GROUP + GROUP // 2, delay=0.03)
    one_pass(store)
    assert store.staging == STAGING + 1
    assert "(the host room fits 5, not" in store.growth[0]
    store.close()


@pytest.mark.parametrize("room", [None, 0])
def test_without_room_the_leases_stay(disk_dir: Path, room: int | None) -> None:
    store = make(disk_dir, room=room, delay=0.03)
    one_pass(store)
    assert store.staging == STAGING and store.growth == []
    store.close()


def test_how_much_the_leases_grow(disk_dir: Path) -> None:
    """32 groups in 16.6 s of which 5.3 s waiting: by the host clock the disk takes 0.52 s a
    group and compute 0.35, so 32 * (1 - 0.35 / 0.52) = 10.2 groups in leases would keep the
    forward ahead; the host clock understates compute, so half of that is added, then more while
    a forward still waits. A wait under WAIT_SHARE of the forward adds nothing, and no more than
    a forward's groups are ever leased."""
    store = make(disk_dir, room=1 << 40)
    store._lease_bytes = GROUP
    store._grow(0.0, 5.3, 32, 16.6)
    assert store.staging == STAGING + math.ceil(32 * 5.3 / 16.6 / 2) == 10
    # Their memory is mapped at once (leased and given back), not in the passes that use them.
    assert store.pool is not None
    stats = store.pool.stats()
    assert stats.reserved >= 10 * GROUP and stats.in_use == 0
    store._grow(0.0, 0.1, 32, 11.4)
    assert store.staging == 10  # under 1% of the forward
    store._grow(0.0, 0.5, 32, 11.8)
    assert store.staging == 11
    store._grow(0.0, 12.0, 32, 12.0)  # all of it waiting: 16 more
    assert store.staging == 27
    store._grow(0.0, 12.0, 32, 12.0)
    assert store.staging == 32
    assert len(store.growth) == 4
    store.grow_to(20, "asked")  # fewer than there are: nothing changes
    assert store.staging == 32 and len(store.growth) == 4
    store.close()


def test_auto_sizes_the_leases_with_its_keeps(disk_dir: Path) -> None:
    """offload_saved auto with the boundary states on a slow disk: the store does not grow its
    leases by itself, the choice does (the forward waits for the disk, the host has room), and
    says so; training matches recomputing every block with the store's own growth, bitwise."""
    import offload
    from tests.models import batches, run_steps, tiny

    data = batches(5)
    runs = {}
    for name in ("recompute", "auto"):
        torch.manual_seed(0)
        model, opt = offload.wrap(
            tiny("llama", layers=8),
            device="cpu",
            dtype="float32",
            placement={"activations": "nvme", "offload_saved": "auto" if name == "auto" else "never"},
            nvme_dirs=[str(disk_dir)],
        )
        store = model.runtime.activations.boundary
        assert isinstance(store, NvmeStore) and (store.room is None) == (name == "auto")
        for f in store._files:
            f.file = SlowFile(f.file, 0.03)  # type: ignore[assignment]
        runs[name] = run_steps(model, opt, 5, 1, lambda step, _: data[step])
        if name == "auto":
            decision = model.runtime.activations.measure.decision
            assert decision is not None and decision.staging.startswith(f"staging {STAGING} -> ")
            assert store.staging > STAGING
            assert ": chosen with the keeps (offload_saved auto); mapped in " in store.growth[0]
        else:
            assert store.staging > STAGING and "the forward waited" in store.growth[0]
        model.runtime.close()
    assert runs["auto"] == runs["recompute"]


def test_leases_the_host_cannot_hold_are_not_taken(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool gives out two leases, then is exhausted: the store grows no further than that, and
    says so."""
    from offload.memory.pool import PoolExhausted

    store = make(disk_dir, room=1 << 40)
    store._lease_bytes = GROUP
    real, given = store._lease, []

    def lease(nbytes: int):  # type: ignore[no-untyped-def]
        if len(given) == 2:
            raise PoolExhausted("no room")
        given.append(real(nbytes))
        return given[-1]

    monkeypatch.setattr(store, "_lease", lease)
    store.grow_to(10, "asked")
    assert store.staging == STAGING and store.growth == []  # two mapped: fewer than there were
    given.clear()
    store.staging = 1
    store.grow_to(10, "asked")
    assert store.staging == 2
    assert len(store.growth) == 1
    assert store.growth[0].startswith(
        "staging 1 -> 2 leases of 0.00 GiB: asked (host memory held 2); mapped in "
    )
    # What the time went to: the pool's parts, and the wait for the store's lock.
    assert re.search(
        r"\(map [\d.]+ s, pin [\d.]+ s, io [\d.]+ s; [\d.]+ s waiting for the store\)$", store.growth[0]
    )
    assert store.pool is not None and store.pool.stats().in_use == 0
    store.close()


def test_groups_of_two_sizes_share_the_leases_grow_to_mapped(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first block's group is the larger (it carries the tables later blocks share), and a
    lease of its size needs an arena of its own while the others' fit the pool's regular arenas.
    Every lease is of the largest group's size, so the leases grow_to mapped hold the smaller
    groups too: a pass maps nothing more."""
    from offload.memory.pool import PinnedPool

    store = make(disk_dir, room=None)

    # Arenas of one small group: a group any larger gets an arena of its own.
    def small_arenas(nbytes: int) -> PinnedPool:
        pool = PinnedPool(1 << 30, arena_bytes=GROUP, pin=False)
        pool.attach_io(store._engine)
        return pool

    monkeypatch.setattr(store, "_make_pool", small_arenas)
    data = [[torch.full(((GROUP + 4096) // 4,), 0.0)], *groups(8)[1:]]
    handles = [store.put(i, g) for i, g in enumerate(data)]
    for i in reversed(range(8)):
        assert torch.equal(store.get(handles[i])[0], data[i][0])
    store.grow_to(8, "asked")
    assert store.pool is not None
    mapped = store.pool.stats().reserved
    assert mapped == 8 * (GROUP + 4096)  # the eight leases, each of the larger size
    for _ in range(2):
        handles = [store.put(i, g) for i, g in enumerate(data)]
        for i in reversed(range(8)):
            assert torch.equal(store.get(handles[i])[0], data[i][0])
    assert store.pool.stats().reserved == mapped
    store.close()
