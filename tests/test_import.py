"""`import offload` must stay lean: no CUDA initialisation, no threads, no files touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, os, sys
before = set(os.listdir("."))
fds_before = set(os.listdir("/proc/self/fd"))
import offload
import offload.io, offload.memory, offload.cli.main
after = set(os.listdir("."))
fds_after = set(os.listdir("/proc/self/fd"))
torch = sys.modules.get("torch")
print(json.dumps({
    "threads": len(os.listdir("/proc/self/task")),
    "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
    "new_files": sorted(after - before),
    "new_fds": len(fds_after - fds_before),
    "version": offload.__version__,
}))
"""


def test_import_is_lean(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["threads"] == 1, facts
    assert not facts["cuda_initialized"]
    assert facts["new_files"] == []
    assert facts["new_fds"] == 0, facts
    assert facts["version"].count(".") == 2


def test_import_offload_alone_does_not_import_torch() -> None:
    code = "import sys, offload; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
