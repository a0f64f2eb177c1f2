"""The NVMe store's staging leases grow where the disk holds the forward back
(offload/engine/activations_nvme.py): by the share of the forward it waited, within the host room
it is given, and the groups still in their leases when backward begins are never read back."""

from __future__ import annotations

import math
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
    one_pass(store)  # eight writes of 30 ms each against puts that take next to nothing
    assert STAGING < store.staging <= 8 + store.depth
    (note,) = store.growth
    assert note.startswith(f"staging {STAGING} -> {store.staging} leases of 0.00 GiB: the forward waited")
    # The next pass's groups all stay in their leases: nothing is read back.
    for f in store._files:
        f.file = f.file.file  # type: ignore[attr-defined]
    store.clock.start()
    one_pass(store)
    written, read = store.clock.stop()
    assert written.nbytes == 8 * GROUP and read.nbytes == 0
    store.close()


def test_the_leases_grow_only_within_the_host_room(disk_dir: Path) -> None:
    store = make(disk_dir, room=2 * GROUP + GROUP // 2, delay=0.03)
    one_pass(store)
    assert store.staging == STAGING + 2
    assert "(the host room fits 6, not" in store.growth[0]
    store.close()


@pytest.mark.parametrize("room", [None, 0])
def test_without_room_the_leases_stay(disk_dir: Path, room: int | None) -> None:
    store = make(disk_dir, room=room, delay=0.03)
    one_pass(store)
    assert store.staging == STAGING and store.growth == []
    store.close()


def test_how_much_the_leases_grow(disk_dir: Path) -> None:
    """32 groups in 16.6 s of which 5.3 s waiting: the disk takes 0.52 s a group, compute 0.35,
    and the forward stays ahead with 32 * (1 - 0.35 / 0.52) = 10.2 groups in leases: 11, and one
    spare. Then a later wait adds to that; a wait under WAIT_SHARE of the forward adds nothing,
    and no more than a forward's groups and the read-ahead are ever leased."""
    store = make(disk_dir, room=1 << 40)
    store._lease_bytes = GROUP
    store._grow(0.0, 5.3, 32, 16.6)
    assert store.staging == math.ceil(32 * 5.3 / 16.6) + 1 == 12
    store._grow(0.0, 0.1, 32, 11.4)
    assert store.staging == 12  # under 1% of the forward
    store._grow(0.0, 0.5, 32, 11.8)
    assert store.staging == 12 + math.ceil(32 * 0.5 / 11.8) == 14
    store._grow(0.0, 10.0, 32, 12.0)
    assert store.staging == 32 + store.depth
    assert len(store.growth) == 3
    store.close()
