"""offload: train PyTorch models larger than the GPU by streaming state between memory tiers.

Importing this package is cheap on purpose: it does not initialise CUDA, start threads or touch
the disk. Subpackages (offload.io, offload.memory, ...) load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from offload._version import __version__

_SUBMODULES = ("io", "memory", "cli", "utils")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"offload.{name}")
    raise AttributeError(f"module 'offload' has no attribute {name!r}")
