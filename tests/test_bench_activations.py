"""scripts/bench_activations.py and scripts/plan_estimate.py run end to end on the CPU with the
tiny shape (their figures are not checked: timing lives in the benchmarks, not in tests)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.launch import run_script


def script(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_script(name, "--size", "tiny", *argv)


def test_the_activation_bench_records_lanes_memory_and_the_decision(tmp_path: Path) -> None:
    out, trace = tmp_path / "act.json", tmp_path / "trace.json"
    proc = script(
        "bench_activations.py", "--device", "cpu", "--seqs", "32", "--placements", "recompute,auto",
        "--steps", "2", "--out", str(out), "--trace", str(trace),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  trace step 0 wall_s" in proc.stdout
    rows = {r["placement"]: r for r in json.loads(out.read_text())["results"]}
    for r in rows.values():
        assert r["result"] == "ok" and len(r["host_GiB"]) == len(r["steps"]) == len(r["trace_steps"])
        assert all(h["rss"] > 0 and h["cpu_busy_s"] >= 0 for h in r["host_GiB"])
        assert all(t["compute_s"] > 0 and t["wall_s"] >= t["compute_s"] for t in r["trace_steps"])
    assert set(rows["auto"]["decide_s"]) == {"sync", "costs", "link", "choose"}
    assert "decide_s" not in rows["recompute"]
    assert json.loads(trace.read_text())["traceEvents"]

    compared = tmp_path / "plan.json"
    proc = script("plan_estimate.py", "--seqs", "32", "--compare", str(out), "--out", str(compared))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(compared.read_text())["rows"]
    assert row["seq"] == 32 and row["measured_recompute_s"] == rows["recompute"]["step_s"]
    assert row["recompute_step_s"] > 0 and row["rates"][0].startswith("offload_saved: assumed")
    assert f"{row['measured_recompute_s']:.3f}" in proc.stdout
