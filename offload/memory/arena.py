"""Host arenas and the leases carved from them.

:class:`HostArena` is the facade over ``offload._C.Arena`` (the only module that imports ``_C`` for
memory): page-aligned anonymous memory, transparent huge pages asked for with madvise, bound to a
NUMA node with mbind before the first touch, every page faulted in. This side adds the CUDA
registration at the arena's exact size and zero-copy torch views. A :class:`Lease` is one aligned
byte range of an arena with a use-after-release guard; which range, and the accounting, is the
pool's business (``pool.py``).
"""

from __future__ import annotations

import ctypes
import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from offload import _C
from offload.memory import cuda

if TYPE_CHECKING:
    import torch


def page_size() -> int:
    """The kernel's base page size; arena sizes are rounded up to it."""
    return int(_C.page_size())


class HostArena:
    """A mapped range of host memory. Closing unregisters it from CUDA and unmaps it."""

    def __init__(self, nbytes: int, *, node: int | None, hugepages: bool, pin: bool) -> None:
        # Populate: pages land on the bound node now (not at some later first touch), the ledger's
        # reserved bytes are resident bytes, and no page fault ever happens on the hot path.
        start = time.perf_counter()
        self._raw = _C.Arena(nbytes, hugepages, -1 if node is None else node, True)
        self._pinned = False
        mapped = time.perf_counter()
        if pin:
            try:
                cuda.host_register(self.ptr, self.size)
            except BaseException:
                self._raw.close()
                raise
            self._pinned = True
        # Seconds mapping took (mmap, madvise, every page touched), and pinning.
        self.map_s, self.pin_s = mapped - start, time.perf_counter() - mapped
        # An arena dropped without close() (its pool garbage-collected) is still unregistered and
        # unmapped. Not at interpreter exit: the process's end releases both anyway.
        self._finalizer = weakref.finalize(self, _release, self._raw, self.ptr if self._pinned else None)
        self._finalizer.atexit = False

    @property
    def ptr(self) -> int:
        """Address of the first byte (page-aligned)."""
        return int(self._raw.ptr)

    @property
    def size(self) -> int:
        """Mapped bytes: the requested size rounded up to the page size."""
        return int(self._raw.size)

    @property
    def node(self) -> int | None:
        """NUMA node the range is bound to, or None when unbound."""
        node = int(self._raw.node)
        return None if node < 0 else node

    @property
    def hugepages(self) -> bool:
        """Whether madvise(MADV_HUGEPAGE) was accepted (a request; the kernel may still use 4 KiB)."""
        return bool(self._raw.hugepages)

    @property
    def pinned(self) -> bool:
        """Whether the range is registered with CUDA (page-locked, DMA-able)."""
        return self._pinned

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor over ``[offset, offset + nbytes)``: a view, not a copy.

        The tensor keeps the arena mapped for as long as it lives (until an explicit
        :meth:`close`, after which using it is a use-after-free: leases guard against that).
        """
        import torch

        if self.closed:
            raise ValueError("arena is closed")
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.size:
            raise ValueError(f"range [{offset}, {offset + nbytes}) is outside the arena of {self.size} bytes")
        buffer = (ctypes.c_ubyte * nbytes).from_address(self.ptr + offset)
        buffer._offload_arena = self  # type: ignore[attr-defined]  # the tensor holds the buffer
        return torch.frombuffer(buffer, dtype=torch.uint8)

    def page_nodes(self, max_pages: int = 64) -> list[int]:
        """NUMA node of up to ``max_pages`` pages sampled evenly (negative errno: page not placed)."""
        return list(self._raw.page_nodes(max_pages))

    def policy(self) -> tuple[int, int]:
        """(mode, node mask of nodes 0-63) of the range, from get_mempolicy(MPOL_F_ADDR)."""
        mode, mask = self._raw.policy()
        return int(mode), int(mask)

    def close(self) -> None:
        """Unregisters from CUDA (if pinned) and unmaps; a second call does nothing."""
        self._pinned = False
        self._finalizer()  # runs _release once, whoever calls first

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.ptr:#x}"
        return f"HostArena({state}, size={self.size}, node={self.node}, pinned={self.pinned})"


def _release(raw: Any, pinned_ptr: int | None) -> None:
    try:
        if pinned_ptr is not None:
            cuda.host_unregister(pinned_ptr)
    finally:
        # Unmap even if CUDA refused: keeping the mapping would not make the registration valid.
        raw.close()


class LeaseError(RuntimeError):
    """A lease used wrongly: released twice, used after release, or outstanding at close."""


class Lease:
    """``nbytes`` of an arena, from ``pool.lease``; returned by ``release()`` or by leaving ``with``.

    After release the memory may belong to another lease: ``ptr``, ``tensor`` and ``view`` raise
    LeaseError then. Tensors taken earlier cannot be revoked; the pool's ``poison`` option shows them.
    """

    __slots__ = ("_arena", "_nbytes", "_offset", "_purpose", "_release_to", "_state", "_tensor")

    def __init__(
        self, release_to: Callable[[Lease], None], arena: HostArena, offset: int, nbytes: int, purpose: str
    ) -> None:
        # The owner's release function: it checks for double release and frees the block under its lock.
        self._release_to = release_to
        self._arena = arena
        self._offset = offset
        self._nbytes = nbytes
        self._purpose = purpose
        self._state: Literal["active", "released", "revoked"] = "active"
        self._tensor: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def purpose(self) -> str:
        return self._purpose

    @property
    def node(self) -> int | None:
        """NUMA node the lease's arena is bound to (None: unbound)."""
        return self._arena.node

    @property
    def arena(self) -> HostArena:
        """The arena holding the lease (for :func:`offload.memory.numa.verify_binding`)."""
        return self._arena

    @property
    def offset(self) -> int:
        """Offset of the lease in its arena (a multiple of ALIGNMENT)."""
        return self._offset

    @property
    def released(self) -> bool:
        return self._state != "active"

    @property
    def ptr(self) -> int:
        """Address of the first byte; a multiple of ALIGNMENT (4096)."""
        self._check("ptr")
        return self._arena.ptr + self._offset

    @property
    def tensor(self) -> torch.Tensor:
        """A uint8 CPU tensor of exactly ``nbytes`` over the lease (a view: writes land in the arena)."""
        self._check("tensor")
        if self._tensor is None:
            self._tensor = self._arena.tensor(self._offset, self._nbytes)
        return self._tensor

    def view(self, dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The lease as ``dtype`` elements: all of it, or the first ``shape`` worth of bytes."""
        raw = self.tensor
        if shape is None:
            if self._nbytes % dtype.itemsize:
                raise ValueError(
                    f"{self._nbytes} bytes are not a whole number of {dtype} elements; pass a shape"
                )
            return raw.view(dtype)
        need = math.prod(shape) * dtype.itemsize
        if need > self._nbytes:
            raise ValueError(
                f"shape {tuple(shape)} of {dtype} needs {need} bytes; the lease has {self._nbytes}"
            )
        return raw[:need].view(dtype).view(tuple(shape))

    def release(self) -> None:
        """Returns the memory to the pool; a second release raises LeaseError."""
        self._release_to(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        where = f"{self._arena.ptr + self._offset:#x}" if self._state == "active" else self._state
        return f"Lease({self._purpose!r}, {self._nbytes} bytes, {where}, node={self.node})"

    def _check(self, what: str) -> None:
        if self._state == "released":
            raise LeaseError(f"{self!r}.{what} used after release; the memory may belong to another lease")
        if self._state == "revoked":
            raise LeaseError(
                f"{self!r}.{what} used after its pool was closed with force=True; it is unmapped"
            )

    def _end(self, state: Literal["released", "revoked"]) -> None:
        """Called by the owner, under its lock, when the lease goes back or the pool is force-closed."""
        self._state = state
        self._tensor = None
