"""The ``offload`` console command: version, dispatch, and that importing it stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from offload._version import __version__
from offload.cli.main import main


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"offload {__version__}"


def test_version_module_subprocess() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "offload.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"offload {__version__}"


@pytest.mark.skipif(shutil.which("offload") is None, reason="console script not installed (pip install -e .)")
def test_version_console_script() -> None:
    exe = shutil.which("offload")
    assert exe is not None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"offload {__version__}"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "doctor" in capsys.readouterr().err


def test_bench_without_kind_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "io" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_import_is_light() -> None:
    code = (
        "import sys, offload.cli.main; "
        "heavy = [m for m in ('torch', 'numpy', 'offload._C', 'offload.io') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
