"""Turns the buffers users pass (tensors, arrays, leases, bytes-likes) into an address and a size.

The engine reads and writes raw memory, so the facade must keep the owning Python object alive
until the I/O completes; BufferRef carries that owner along with the address.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class BufferRef:
    ptr: int
    nbytes: int
    writable: bool
    owner: Any  # kept alive while the I/O is in flight


def buffer_ref(buf: Any) -> BufferRef:
    """Address, size and writability of buf, which may be a CPU torch tensor, a numpy array,
    a pool lease (anything with a ``tensor`` attribute) or any contiguous buffer-protocol object."""
    tensor = getattr(buf, "tensor", None)
    if tensor is not None and not isinstance(buf, (bytes, bytearray, memoryview)):
        return _tensor_ref(tensor, owner=buf)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor):
        return _tensor_ref(buf, owner=buf)
    import numpy as np

    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("I/O buffer must be C-contiguous, got a strided numpy array")
        return BufferRef(int(buf.ctypes.data), int(buf.nbytes), bool(buf.flags.writeable), buf)
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(
            f"I/O buffer must be a tensor, numpy array, pool lease or bytes-like object, got {type(buf).__name__}"
        ) from None
    if not view.contiguous:
        raise ValueError("I/O buffer must be contiguous")
    if view.nbytes == 0:
        return BufferRef(0, 0, not view.readonly, buf)
    arr = np.frombuffer(view.cast("B"), dtype=np.uint8)
    return BufferRef(int(arr.ctypes.data), int(arr.nbytes), not view.readonly, (buf, arr))


def _tensor_ref(tensor: Any, owner: Any) -> BufferRef:
    if tensor.device.type != "cpu":
        raise ValueError(f"I/O buffer must be in host memory, got a tensor on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("I/O buffer must be a contiguous tensor")
    nbytes = tensor.numel() * tensor.element_size()
    return BufferRef(int(tensor.data_ptr()), int(nbytes), True, owner)
