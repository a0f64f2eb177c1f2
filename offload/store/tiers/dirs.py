"""The directories of NVMe-tier files (``Config.nvme_dirs``): checked once, one subdirectory per run.

Every tier that keeps files (Adam state, activations) goes through these two functions, so a
directory is refused with the same message whichever tier asked for it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from offload import io as oio
from offload.config import ConfigError


def check_dir(d: str, i: int) -> None:
    """Raises ConfigError naming nvme_dirs[i] unless O_DIRECT works there. A missing directory is
    created when its parent exists (so a recipe can name a fresh directory of the checkout)."""
    base = Path(d).expanduser()
    try:
        base.mkdir()
    except FileExistsError:
        pass
    except OSError as e:  # no parent, or a parent we may not enter or write
        raise ConfigError(
            f"nvme_dirs[{i}]", d, f"{base} does not exist and cannot be created: {e.strerror}"
        ) from None
    check = oio.check_direct(base)
    if not check.ok:
        raise ConfigError(f"nvme_dirs[{i}]", d, check.reason)


def run_dir(d: str, tag: str = "") -> Path:
    """This run's own subdirectory of d: two runs (or two tiers) sharing a drive never share a file."""
    run = Path(d).expanduser() / f"offload-{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    run.mkdir()
    return run
