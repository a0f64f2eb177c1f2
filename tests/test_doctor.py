"""``offload doctor``: the report, its verdict and exit status, and probes that break."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from offload.cli import doctor
from offload.cli.main import main

NAMES = {
    "offload",
    "gpu",
    "cuda host register",
    "host ram",
    "numa",
    "memlock",
    "directory",
    "disk free",
    "o_direct",
    "io_uring",
    "io threads",
    "io engine",
}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["doctor", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_passes_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_json(capsys, "--dir", str(tmp_path))
    assert rc == 0
    assert report["ok"] is True
    assert report["verdict"].startswith("offload can run here")
    assert report["dir"] == str(tmp_path)
    checks = by_name(report)
    assert set(checks) == NAMES
    for c in report["checks"]:
        assert c["status"] in ("ok", "warn", "fail", "n/a")
        assert c["detail"]
    assert checks["directory"]["status"] == "ok"
    assert checks["io engine"]["status"] == "ok"
    assert "verified" in checks["io engine"]["detail"]
    assert list(tmp_path.iterdir()) == []  # the round-trip file is gone


def test_doctor_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert out.strip().splitlines()[-1].startswith("verdict: offload can run here")


def test_doctor_missing_dir_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    rc, report = run_json(capsys, "--dir", str(missing))
    assert rc == 1
    assert report["ok"] is False
    checks = by_name(report)
    assert checks["directory"] == {
        "name": "directory",
        "status": "fail",
        "detail": f"{missing} does not exist",
        "required": True,
    }
    assert checks["disk free"]["status"] == "n/a"
    assert checks["o_direct"]["status"] == "n/a"
    assert report["verdict"] == f"offload cannot run here: directory: {missing} does not exist"


def test_doctor_missing_dir_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--dir", str(tmp_path / "nope")]) == 1
    assert "verdict: offload cannot run here: directory:" in capsys.readouterr().out


def test_doctor_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc, report = run_json(capsys, "--dir", str(f))
    assert rc == 1
    assert by_name(report)["directory"]["detail"] == f"{f} is not a directory"


def test_probe_that_raises_becomes_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(ctx: Any) -> Any:
        raise RuntimeError("sysfs exploded")

    probes = [(n, req, broken if n == "numa" else p) for n, req, p in doctor.PROBES]
    monkeypatch.setattr(doctor, "PROBES", probes)
    rc, report = run_json(capsys, "--dir", str(tmp_path))
    assert rc == 0
    assert by_name(report)["numa"]["status"] == "warn"
    assert by_name(report)["numa"]["detail"] == "probe raised RuntimeError: sysfs exploded"


def test_required_probe_that_raises_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(ctx: Any) -> Any:
        raise OSError("no engine for you")

    probes = [(n, req, broken if n == "io engine" else p) for n, req, p in doctor.PROBES]
    monkeypatch.setattr(doctor, "PROBES", probes)
    rc, report = run_json(capsys, "--dir", str(tmp_path))
    assert rc == 1
    assert by_name(report)["io engine"]["status"] == "fail"
    assert "io engine: probe raised OSError: no engine for you" in report["verdict"]


def test_env_backend_override_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OFFLOAD_IO_BACKEND", "threads")
    rc, report = run_json(capsys, "--dir", str(tmp_path))
    assert rc == 0
    assert by_name(report)["io engine"]["detail"].startswith(
        "auto selects threads (OFFLOAD_IO_BACKEND=threads)"
    )


def test_summarize_counts_warnings() -> None:
    checks = [doctor.Check("a", "ok", "x"), doctor.Check("b", "warn", "y"), doctor.Check("c", "n/a", "z")]
    assert doctor.summarize(checks) == (True, "offload can run here (1 warning)")
    checks.append(doctor.Check("d", "fail", "broken", required=False))
    assert doctor.summarize(checks) == (True, "offload can run here (2 warnings)")
    checks.append(doctor.Check("e", "fail", "gone", required=True))
    assert doctor.summarize(checks) == (False, "offload cannot run here: e: gone")


def test_fs_type_of_root() -> None:
    assert doctor.fs_type(Path("/")) != ""


def test_io_uring_refused_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import offload.io as oio

    monkeypatch.setattr(
        oio, "probe", lambda: oio.UringStatus(False, "io_uring_setup: Operation not permitted", 2)
    )
    rc, report = run_json(capsys, "--dir", str(tmp_path))
    assert rc == 0
    check = by_name(report)["io_uring"]
    assert check["status"] == "warn"
    assert check["detail"] == (
        "io_uring_setup: Operation not permitted (kernel.io_uring_disabled 2): the threads backend is used instead"
    )


def test_low_memlock_limit_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.resource, "getrlimit", lambda which: (8 << 20, 8 << 20))
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(doctor, "_has_cap_ipc_lock", lambda: False)
    status, detail = doctor._memlock(doctor._Context(dir=Path(".")))
    assert status == "warn"
    assert detail.startswith("RLIMIT_MEMLOCK 8 MiB: pool memory beyond it cannot be locked")
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 0)
    assert doctor._memlock(doctor._Context(dir=Path("."))) == (
        "ok",
        "RLIMIT_MEMLOCK 8 MiB, bypassed: running as root or with CAP_IPC_LOCK",
    )


def test_no_gpu_is_a_warning_not_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, report = run_json(capsys, "--dir", str(tmp_path))
    assert rc == 0
    checks = by_name(report)
    assert checks["gpu"]["status"] == "warn"
    assert checks["gpu"]["detail"].endswith("compute runs on the CPU")
    assert checks["cuda host register"]["status"] == "n/a"


def test_cxl_candidate_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from offload.memory import numa

    nodes = [
        numa.NumaNode(id=0, mem_total=64 << 30, cpus=(0, 1)),
        numa.NumaNode(id=1, mem_total=256 << 30, cpus=()),
    ]
    monkeypatch.setattr(numa, "list_nodes", lambda: nodes)
    status, detail = doctor._numa(doctor._Context(dir=Path(".")))
    assert status == "ok"
    assert detail == (
        "2 nodes with memory, 1 without CPUs (CXL candidates): node0 64 GiB CPUs, node1 256 GiB no CPUs (CXL candidate)"
    )
