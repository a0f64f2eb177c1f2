"""Checkpoints of wrapped models: ``offload.save(model, optimizer, root, step=...)``,
``offload.load(model, optimizer, root)``, ``verify(path)``. See docs/checkpoint.md.

Names load on first access, so the torch-free parts (format.py, integrity.py: what ``offload ckpt``
uses) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "save": "offload.checkpoint.writer",
    "SaveHandle": "offload.checkpoint.handle",
    "SaveStats": "offload.checkpoint.handle",
    "load": "offload.checkpoint.reader",
    "verify": "offload.checkpoint.integrity",
    "CheckpointCorrupt": "offload.checkpoint.format",
    "CheckpointError": "offload.checkpoint.format",
    "CheckpointNotFound": "offload.checkpoint.format",
    "Problem": "offload.checkpoint.format",
    "list_checkpoints": "offload.checkpoint.format",
    "resolve": "offload.checkpoint.format",
    "Retention": "offload.checkpoint.retention",
    "prune": "offload.checkpoint.retention",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'offload.checkpoint' has no attribute {name!r}")
