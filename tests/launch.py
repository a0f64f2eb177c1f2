"""Starting a test's worker on several CPU ranks (gloo) under torchrun, or one of scripts/ in a
process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_script(name: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """scripts/name with argv in a new interpreter, the repository on its path; the caller
    checks the returned process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
