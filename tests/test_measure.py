"""The rates the recompute-or-keep choice measures (offload/plan/measure.py): here the disk probe,
on the CPU. Its figures are not checked against a speed (timing lives in scripts/), only that
it moves the bytes, reports a rate for each way and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload.plan.measure import Rates, measure_disk


def test_the_disk_probe_measures_both_ways_and_cleans_up(disk_dir: Path) -> None:
    before = set(disk_dir.iterdir())
    write, read = measure_disk(disk_dir, 1 << 20)
    assert write > 0 and read > 0
    assert set(disk_dir.iterdir()) == before


@pytest.mark.parametrize("nbytes", [0, -4096, 4097])
def test_the_disk_probe_refuses_a_size_o_direct_cannot_move(disk_dir: Path, nbytes: int) -> None:
    with pytest.raises(
        ValueError, match=f"nbytes must be a positive multiple of 4096 \\(O_DIRECT\\), got {nbytes}"
    ):
        measure_disk(disk_dir, nbytes)


def test_the_disk_probe_says_why_a_directory_cannot_be_measured(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=f"{tmp_path / 'missing'} does not exist or is not a directory"):
        measure_disk(tmp_path / "missing", 1 << 20)


@pytest.mark.parametrize("field", ["disk_write_bytes_s", "disk_read_bytes_s", "memory_bytes_s"])
def test_byte_rates_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be > 0 bytes/s, got 0"):
        Rates(1.0, 1.0, 1.0, **{field: 0})
    assert getattr(Rates(1.0, 1.0, 1.0), field) is None  # not counted


def test_the_memory_probe_counts_a_copy_as_read_and_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the probe copies within host memory; a copy taking 1 s moves twice its bytes."""
    import offload.plan.measure as measure

    monkeypatch.setattr(measure, "_best", lambda fn, device, reps: (fn(), 1.0)[1])
    assert measure.measure_memory(torch.device("cpu"), nbytes=1 << 20) == 2 * (1 << 20)
