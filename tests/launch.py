"""Starting a test's worker on several CPU ranks (gloo) under torchrun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from offload.train.ranks import torchrun

REPO = Path(__file__).resolve().parents[1]


def run_ranks(
    world: int, *args: str, ok: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """torchrun of args (a script and its arguments, or -m and a module) on world ranks, from the
    repository root with it on the path, one thread each; asserts it succeeded unless ok is
    False (a test of a failure reads the returned process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*torchrun(world), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
