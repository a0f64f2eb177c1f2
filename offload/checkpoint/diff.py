"""Compare two checkpoints tensor by tensor (``offload ckpt diff A B``).

For every tensor key in either manifest: the largest absolute difference, or which side lacks it
or a shape mismatch. Whole tensors are compared, one at a time, read with NumPy (no torch, no copy
of a whole checkpoint): a multi-rank checkpoint's shards are put together first (pieces.py), so
checkpoints saved at different world sizes compare. Checkpoints hold float32 tensors only, which
NumPy reads natively.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from offload.checkpoint.format import read_manifest, resolve
from offload.checkpoint.pieces import Files


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """One tensor of the union: its max |a - b|, or None and a note when it cannot be compared."""

    key: str
    max_abs: float | None
    note: str = ""


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[TensorDiff]:
    """Per-tensor differences between checkpoints a and b (step directories or roots), sorted by key."""
    pa, pb = resolve(a), resolve(b)
    ta, tb = read_manifest(pa)["tensors"], read_manifest(pb)["tensors"]
    out = []
    with Files(pa) as fa, Files(pb) as fb:
        for key in sorted(set(ta) | set(tb)):
            if key not in tb:
                out.append(TensorDiff(key, None, "only in A"))
            elif key not in ta:
                out.append(TensorDiff(key, None, "only in B"))
            elif ta[key]["shape"] != tb[key]["shape"]:
                out.append(TensorDiff(key, None, f"shape {ta[key]['shape']} vs {tb[key]['shape']}"))
            else:
                x, y = fa.read(key, ta[key]), fb.read(key, tb[key])
                dx = np.abs(x.astype(np.float64) - y.astype(np.float64))
                out.append(TensorDiff(key, float(dx.max()) if dx.size else 0.0))
    return out
