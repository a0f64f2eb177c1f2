"""scripts/bench_snapshot.py runs end to end on the CPU (in this process: the tiny shape, one step
per phase). Its figures are not checked: timing lives in the benchmark, not in tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_snapshot  # noqa: E402


def test_bench_snapshot_tiny_on_cpu(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "bench.json"
    argv = ["--size", "tiny", "--steps", "1", "--batch", "1", "--seq", "16", "--cpu"]
    assert bench_snapshot.main([*argv, "--dir", str(tmp_path / "d"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    worst = report["max_over_ranks"]
    assert (report["world"], report["k"], report["m"]) == (1, 1, 0)
    assert worst["payload"] > 12 * report["params"]  # master, m and v of every parameter
    assert worst["flushed_bytes"] >= worst["payload"] and report["ranks"][0]["restored_from"] == "keeper"
    assert not (tmp_path / "d" / "keeper" / "keeper.sock").exists()  # the keeper was stopped
