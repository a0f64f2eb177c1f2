"""Compare two checkpoints tensor by tensor (``offload ckpt diff A B``).

For every tensor key in either manifest: the largest absolute difference, or which side lacks it
or a shape mismatch. The tensors are read through memory maps one at a time with NumPy (no torch,
no copy of a whole checkpoint). Checkpoints hold float32 tensors only, which NumPy reads natively.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offload.checkpoint.format import read_manifest, resolve

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


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
    for key in sorted(set(ta) | set(tb)):
        if key not in tb:
            out.append(TensorDiff(key, None, "only in A"))
        elif key not in ta:
            out.append(TensorDiff(key, None, "only in B"))
        elif ta[key]["shape"] != tb[key]["shape"]:
            out.append(TensorDiff(key, None, f"shape {ta[key]['shape']} vs {tb[key]['shape']}"))
        else:
            x, y = _array(pa, ta[key]), _array(pb, tb[key])
            dx = np.abs(x.astype(np.float64) - y.astype(np.float64))
            out.append(TensorDiff(key, float(dx.max()) if dx.size else 0.0))
    return out


def _array(path: Path, entry: dict[str, Any]) -> np.ndarray:
    dtype = NUMPY_DTYPES[entry["dtype"]]
    count = entry["nbytes"] // np.dtype(dtype).itemsize
    return np.memmap(path / entry["file"], dtype=dtype, mode="r", offset=entry["offset"], shape=(count,))
