"""scripts/bench_ckpt.py runs end to end on the CPU with the tiny shape (its figures are not
checked: timing lives in the benchmark, not in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_ckpt_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--size", "tiny", "--steps", "2", "--warmup", "1", "--disk-gib", "0.0625", "--cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_ckpt.py"),
            *argv,
            "--dir",
            str(tmp_path / "d"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "offload.save every 1" in proc.stdout and "dcp.async_save once" in proc.stdout
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and len(report["offload"]["stats"]) == 2
    assert {"disk_write_GBps", "stall_pct", "flush_over_disk"} <= set(report) and report["dcp"]["written"] > 0
    assert report["checkpoint_GB"] > 0.9 * report["state_GB"]  # master, m and v of every parameter
    assert list((tmp_path / "d").iterdir()) == []  # checkpoints and probe files cleaned up


def test_bench_ckpt_refuses_a_full_disk(tmp_path: Path) -> None:
    argv = ["--size", "tiny", "--cpu", "--disk-gib", "100000", "--dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_ckpt.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2 and "GB free, needs" in proc.stderr
