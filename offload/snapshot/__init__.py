"""In-memory erasure-coded snapshots (issue 8; docs/snapshot.md).

``Snapshotter(model, optimizer, SnapshotConfig(...))`` keeps a wrapped run's state in the node's
keeper process with Reed-Solomon parity on other nodes' keepers, and restores it after a crash.
``offload.snapshot.codec`` is the Reed-Solomon codec over GF(2^8): k data chunks and m parity
chunks, any k of which restore the data. Importing this package loads nothing else: names load
on first access (the Snapshotter imports torch; the codec, numpy and the native core).
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "Snapshotter": "offload.snapshot.snapshotter",
    "SnapshotConfig": "offload.snapshot.config",
    "SnapshotHandle": "offload.snapshot.config",
    "SnapshotStats": "offload.snapshot.config",
    "Restored": "offload.snapshot.recovery",
    "SnapshotLost": "offload.snapshot.recovery",
    "RestoreFailed": "offload.snapshot.recovery",
    "SnapshotMismatch": "offload.snapshot.payload",
    "KeeperError": "offload.snapshot.keeper",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'offload.snapshot' has no attribute {name!r}")
