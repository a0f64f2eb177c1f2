"""scripts/bench_ckpt.py runs end to end on the CPU with the tiny shape (its figures are not
checked: timing lives in the benchmark, not in tests)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.launch import run_script


def bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return run_script("bench_ckpt.py", "--size", "tiny", "--cpu", *argv)


def test_bench_ckpt_tiny_on_cpu(tmp_path: Path) -> None:
    """The default (prune before), with accumulation, a ring for every host record and a trace."""
    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    argv = ["--steps", "3", "--plain", "2", "--warmup", "1", "--disk-gib", "0.0625", "--accumulate", "2"]
    argv += ["--staging-gib", "host", "--dir", str(tmp_path / "d"), "--out", str(out), "--trace", str(trace)]
    proc = bench(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "offload.save every 1" in proc.stdout and "dcp.async_save once" in proc.stdout
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["accumulate"] == 2 and report["prune"] == "before"
    assert [s["after_step"] for s in report["offload"]["stats"]] == [1, 2]  # never after the last step
    assert [s["way"] for s in report["writer_alone"]] == ["fresh", "overwrite"]
    assert all(s["way"] == "overwrite" and s["reused_bytes"] > 0 for s in report["offload"]["stats"])
    assert report["disk_way"] == "overwrite" and report["disk_write_GBps"] == report["disk"]["overwrite_GBps"]
    assert {"fresh_GBps", "overwrite_GBps", "how"} <= set(report["disk"])
    assert len(report["steps"]) == 3 and {"s", "save", "over_plain_pct"} <= set(report["steps"][0])
    assert len(report["plain_steps"]) == 2 and [t["writing"] for t in report["steps"]] == [False, True, True]
    assert len(report["step_s_quiet"]) == 3 and len(report["step_s_writing"]) == 2  # 2 plain + step 1
    assert "steps writing" in proc.stdout and {"stall_pct_writing", "stall_pct_writing_median"} <= set(report)
    assert {"stall_pct", "stall_pct_stats", "flush_over_disk"} <= set(report) and report["dcp"]["written"] > 0
    assert report["checkpoint_GB"] > 0.9 * report["state_GB"]  # master, m and v of every parameter
    assert report["staging_GB"] > 0 and {
        "crc32_GBps_1",
        "crc32_native_GBps_1",
        "copy_GBps_1",
        "copy_crc32_GBps_1",
    } <= set(report["cpu"])
    names = {e["name"] for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"checkpoint", "recycle", "commit", "prune"} <= names
    assert list((tmp_path / "d").iterdir()) == []  # checkpoints and probe files cleaned up


def test_bench_ckpt_concurrent_delete(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--steps", "3", "--warmup", "0", "--disk-gib", "0.0625", "--prune", "concurrent", "--no-dcp"]
    proc = bench(*argv, "--dir", str(tmp_path / "d"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["disk_way"] == "fresh" and len(report["offload"]["delete_s"]) == 2
    assert all(s["reused_bytes"] == 0 for s in report["offload"]["stats"]) and "dcp" not in report
    assert list((tmp_path / "d").iterdir()) == []


def test_bench_ckpt_refusals(tmp_path: Path) -> None:
    proc = bench("--disk-gib", "100000", "--dir", str(tmp_path))
    assert proc.returncode == 2 and "GB free, needs" in proc.stderr
    proc = bench("--staging-gib", "lots", "--dir", str(tmp_path))
    assert proc.returncode == 2 and "--staging-gib 'lots': a number of GiB, 'host' or 'state'" in proc.stderr
    proc = bench("--staging-gib", "100000", "--dir", str(tmp_path))
    assert proc.returncode == 2 and "staging ring does not fit" in proc.stderr
    proc = bench("--steps", "2", "--save-every", "2", "--dir", str(tmp_path))
    assert proc.returncode == 2 and "--steps more than --save-every" in proc.stderr
    proc = bench("--plain", "0", "--dir", str(tmp_path))
    assert proc.returncode == 2 and "--plain must be >= 1" in proc.stderr
