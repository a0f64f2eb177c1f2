"""Page-locking host memory with CUDA (cudaHostRegister), and deciding whether to.

torch is imported inside the functions, and CUDA is only initialised when a pool that pins is created
(``torch.cuda.cudart()`` initialises the runtime), so importing this module costs nothing.
Registration is at the exact size given: unlike torch's caching host allocator, nothing is rounded
up to a power of two.
"""

from __future__ import annotations

from typing import Any, Literal

PinMode = bool | Literal["auto"]


class PinError(RuntimeError):
    """Pinning was asked for and cannot be done (no CUDA, or the CUDA runtime refused)."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (does not create a CUDA context)."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_pin(pin: PinMode) -> bool:
    """``"auto"``: pin when CUDA is available; ``True``: CUDA is required; ``False``: never pin."""
    if pin == "auto":
        return cuda_available()
    if pin is False:
        return False
    if pin is not True:
        raise ValueError(f"pin must be True, False or 'auto', got {pin!r}")
    if not cuda_available():
        raise PinError(f"pin=True needs CUDA, but {_why_no_cuda()}; use pin='auto' or pin=False")
    return True


def host_register(ptr: int, nbytes: int) -> None:
    """Page-locks ``[ptr, ptr + nbytes)`` and maps it for DMA by the GPU."""
    import torch

    rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    _check(rc, f"cudaHostRegister({ptr:#x}, {nbytes})")


def host_unregister(ptr: int) -> None:
    """Undoes :func:`host_register` for the range starting at ``ptr``."""
    import torch

    rc = torch.cuda.cudart().cudaHostUnregister(ptr)
    _check(rc, f"cudaHostUnregister({ptr:#x})")


def _check(rc: Any, call: str) -> None:
    import torch

    code = int(rc)  # a pybind enum (cudaError) in torch's binding
    if code != 0:
        message = torch.cuda.cudart().cudaGetErrorString(rc)
        raise PinError(f"{call} failed: {message} (cudaError {code})")


def _why_no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "torch.cuda.is_available() is False (no visible GPU or driver)"
