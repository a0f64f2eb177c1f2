"""offload: train PyTorch models larger than the GPU by streaming state between memory tiers.

    model, optimizer = offload.wrap(model, device="cuda", dtype="bfloat16")

Importing this package is cheap on purpose: it does not import torch, initialise CUDA, start
threads or touch the disk. The public API and subpackages load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from offload._version import __version__

_SUBMODULES = (
    "io",
    "memory",
    "cli",
    "utils",
    "config",
    "model",
    "engine",
    "store",
    "train",
    "plan",
    "checkpoint",
)
# Public names and the module each comes from.
_API = {
    "wrap": "offload.api",
    "state_dict": "offload.api",
    "OffloadedModel": "offload.api",
    "Config": "offload.config",
    "load_config": "offload.config",
    "save": "offload.checkpoint",
    "load": "offload.checkpoint",
}

__all__ = ["__version__", *_API, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"offload.{name}")
    raise AttributeError(f"module 'offload' has no attribute {name!r}")
