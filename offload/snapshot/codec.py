"""Reed-Solomon erasure codec over GF(2^8): the facade over the native codec in csrc/core/erasure.cpp.

k equal-length data chunks get m parity chunks; any k of the k + m chunks restore the data, so a
snapshot spread over k + m nodes survives the loss of any m of them.

    parity = codec.encode(data_chunks, m)                  # m parity chunks
    data = codec.decode([d0, None, d2, p0, None], k=3, m=2)  # None marks a lost chunk

The code is systematic (data chunks are stored unchanged) with a Cauchy parity matrix whose first
row is all ones, so parity chunk 0 is the XOR of the data and m = 1 is plain XOR parity
(``parity_matrix``). The field is GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11d).

Chunks: bytes-like objects (bytes, bytearray, memoryview), C-contiguous numpy uint8 arrays or
contiguous CPU torch uint8 tensors, of any shape, read as flat bytes. Results are 1-D torch uint8
tensors when the first chunk given (not None) is a torch tensor, else 1-D numpy uint8 arrays.
``decode`` returns surviving data chunks as flat views of what was passed in (no copy; read-only
for bytes).

The native loops run the best SIMD path this CPU has (GFNI, AVX-512BW, AVX2, else scalar: see
``info``). ``OFFLOAD_EC_ISA=scalar|avx2|avx512|gfni`` forces one for the whole process, and the
``isa`` argument for one call (tests and benchmarks compare them); asking for a path the CPU lacks
is a ValueError. Every call releases the GIL while the bytes are computed.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from offload import _C

if TYPE_CHECKING:
    import torch

    Chunk = np.ndarray | torch.Tensor
else:
    Chunk = Any

MAX_CHUNKS = 256
"""k + m at most: the Cauchy matrix needs k + m distinct elements of the field."""

ISAS = ("scalar", "avx2", "avx512", "gfni")
"""The SIMD paths, slowest first."""


class _Buffers:
    """The chunks of one call as addresses, with what keeps their memory alive."""

    __slots__ = ("addrs", "as_torch", "keep", "nbytes")

    def __init__(self, named: Sequence[tuple[int, object]], what: str, *, writable: bool = False) -> None:
        self.addrs: list[int] = []
        self.keep: list[Any] = []
        self.as_torch = False
        self.nbytes = -1
        first_index = -1
        for n, (index, chunk) in enumerate(named):
            flat, addr, as_torch = _flat(chunk, f"{what} {index}", writable)
            if n == 0:
                self.as_torch, self.nbytes, first_index = as_torch, _len(flat), index
            elif _len(flat) != self.nbytes:
                raise ValueError(
                    f"chunks must have equal lengths; {what} {first_index} has {self.nbytes} bytes, "
                    f"{what} {index} has {_len(flat)}"
                )
            self.addrs.append(addr)
            self.keep.append(flat)

    def empty(self) -> Chunk:
        if self.as_torch:
            import torch

            return torch.empty(self.nbytes, dtype=torch.uint8)
        return np.empty(self.nbytes, dtype=np.uint8)


def _len(flat: Any) -> int:
    return int(flat.numel()) if hasattr(flat, "numel") else int(flat.size)


def _flat(chunk: object, name: str, writable: bool) -> tuple[Any, int, bool]:
    """(flat uint8 view, address, is a torch tensor) of one chunk, or ValueError naming the problem."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(chunk, torch.Tensor):
        if chunk.device.type != "cpu" or chunk.dtype != torch.uint8:
            raise ValueError(f"{name} must be a CPU uint8 tensor; got {chunk.dtype} on {chunk.device}")
        if not chunk.is_contiguous():
            raise ValueError(f"{name} must be contiguous; got stride {chunk.stride()}")
        flat = chunk.reshape(-1)
        return flat, flat.data_ptr(), True
    if isinstance(chunk, np.ndarray):
        if chunk.dtype != np.uint8:
            raise ValueError(f"{name} must be a uint8 array; got {chunk.dtype}")
        if not chunk.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous; got strides {chunk.strides}")
        flat = chunk.reshape(-1)
        if writable and not flat.flags.writeable:
            raise ValueError(f"{name} is an output and must be writable; got a read-only array")
    else:
        try:
            flat = np.frombuffer(chunk, dtype=np.uint8)  # type: ignore[call-overload]
        except (TypeError, ValueError, BufferError) as e:
            raise ValueError(
                f"{name} must be bytes-like, a numpy uint8 array or a torch uint8 tensor; "
                f"got {type(chunk).__name__} ({e})"
            ) from None
        if writable and not flat.flags.writeable:
            raise ValueError(f"{name} is an output and must be writable; got {type(chunk).__name__}")
    return flat, int(flat.__array_interface__["data"][0]), False


def _check_counts(k: int, m: int) -> None:
    for name, value in (("k", k), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    if k + m > MAX_CHUNKS:
        raise ValueError(f"k + m must be <= {MAX_CHUNKS}; got k={k}, m={m}")


def _check_options(threads: int, isa: str | None) -> str:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1; got {threads!r}")
    if isa is not None and isa not in ISAS:
        raise ValueError(f"isa must be None or one of {', '.join(ISAS)}; got {isa!r}")
    return isa or ""


def parity_matrix(k: int, m: int) -> np.ndarray:
    """The m x k uint8 matrix P: parity chunk i is the GF(2^8) sum of P[i, j] * data chunk j."""
    _check_counts(k, m)
    return np.frombuffer(_C.ec_parity_matrix(k, m), dtype=np.uint8).reshape(m, k).copy()


def _check_disjoint(inputs: _Buffers, outputs: _Buffers) -> None:
    """Outputs are written while inputs are still read: an output may share no byte with another chunk."""
    n = inputs.nbytes
    spans = sorted([(a, True) for a in outputs.addrs] + [(a, False) for a in inputs.addrs])
    # All spans have length n, so any overlap with an output shows between neighbours in this order.
    for (a, out_a), (b, out_b) in itertools.pairwise(spans):
        if b < a + n and (out_a or out_b):
            raise ValueError("an output chunk overlaps an input or another output in memory")


def encode(
    data_chunks: Sequence[object],
    m: int,
    *,
    out: Sequence[object] | None = None,
    threads: int = 1,
    isa: str | None = None,
) -> list[Chunk]:
    """The m parity chunks of ``data_chunks`` (k >= 1 chunks of one length).

    out: m writable chunks of that length to write the parity into (returned as flat views);
    None allocates them. threads: worker threads for this call (each takes a contiguous range of
    bytes). isa: force a SIMD path for this call (None: OFFLOAD_EC_ISA, else the best this CPU has).
    """
    if not isinstance(data_chunks, Sequence) or isinstance(data_chunks, (bytes, bytearray, memoryview)):
        raise ValueError(f"data_chunks must be a list of chunks; got {type(data_chunks).__name__}")
    _check_counts(len(data_chunks), m)
    isa_name = _check_options(threads, isa)
    data = _Buffers(list(enumerate(data_chunks)), "data chunk")
    if out is None:
        out = [data.empty() for _ in range(m)]
    elif len(out) != m:
        raise ValueError(f"out must hold m = {m} parity chunks; got {len(out)}")
    parity = _Buffers(list(enumerate(out)), "parity chunk", writable=True)
    _check_lengths(data, parity)
    _check_disjoint(data, parity)
    if data.nbytes:  # an empty tensor's address may be 0, which the core reads as a lost chunk
        _C.ec_encode(data.addrs, parity.addrs, data.nbytes, isa_name, threads)
    return parity.keep


def decode(
    chunks: Sequence[object | None],
    k: int,
    m: int,
    *,
    out: Sequence[object | None] | None = None,
    threads: int = 1,
    isa: str | None = None,
) -> list[Chunk]:
    """The k data chunks, restored from ``chunks``: the k data then the m parity chunks, None for lost.

    At most m chunks may be lost. Surviving data chunks come back as flat views of the input;
    lost ones are rebuilt, into ``out[i]`` for lost data chunk i when ``out`` (k entries, writable
    chunks where data is lost, anything elsewhere) is given, else into new buffers. Lost parity
    chunks are not rebuilt (``encode`` does that from the data). threads and isa as in ``encode``.
    """
    _check_counts(k, m)
    isa_name = _check_options(threads, isa)
    if not isinstance(chunks, Sequence) or len(chunks) != k + m:
        got = len(chunks) if isinstance(chunks, Sequence) else type(chunks).__name__
        raise ValueError(f"chunks must hold k + m = {k + m} entries (None for a lost chunk); got {got}")
    lost = [i for i, c in enumerate(chunks) if c is None]
    if len(lost) > m:
        raise ValueError(
            f"{len(lost)} chunks lost (indices {lost}); m = {m} parity chunks restore at most {m}"
        )
    if out is not None and len(out) != k:
        raise ValueError(
            f"out must hold k = {k} entries (a writable chunk for each lost data chunk); got {len(out)}"
        )
    alive = [i for i, c in enumerate(chunks) if c is not None]
    present = _Buffers([(i, chunks[i]) for i in alive], "chunk")
    lost_data = [i for i in lost if i < k]
    targets: list[object] = [present.empty() if out is None else out[i] for i in lost_data]
    rebuilt = _Buffers(list(zip(lost_data, targets)), "out", writable=True)
    if lost_data:
        _check_lengths(present, rebuilt)
    if lost_data and present.nbytes:  # an empty tensor's address may be 0: the core's mark for lost
        _check_disjoint(present, rebuilt)
        addrs = dict(zip(alive, present.addrs)) | dict(zip(lost_data, rebuilt.addrs))
        _C.ec_decode(
            [addrs[i] if i in alive else 0 for i in range(k + m)],
            k,
            m,
            [addrs[i] if i in lost_data else 0 for i in range(k)],
            present.nbytes,
            isa_name,
            threads,
        )
    flat = dict(zip(alive, present.keep)) | dict(zip(lost_data, rebuilt.keep))
    return [flat[i] for i in range(k)]


def _check_lengths(inputs: _Buffers, outputs: _Buffers) -> None:
    if outputs.nbytes != inputs.nbytes:
        raise ValueError(
            f"output chunks must have the input length {inputs.nbytes} bytes; got {outputs.nbytes}"
        )


def info() -> dict[str, Any]:
    """Which SIMD path calls take (after OFFLOAD_EC_ISA), which this CPU has, and the k + m limit."""
    available = [name for name, ok in _C.ec_isas() if ok]
    return {
        "isa": _C.ec_resolve_isa(""),
        "available": [name for name in ISAS if name in available],
        "max_chunks": MAX_CHUNKS,
    }


def field_tables() -> tuple[np.ndarray, np.ndarray]:
    """The codec's GF(2^8) tables: products (256 x 256, mul[a, b] = a * b) and inverses (inv[0] unused)."""
    mul, inv = _C.gf_tables()
    return (
        np.frombuffer(mul, dtype=np.uint8).reshape(256, 256).copy(),
        np.frombuffer(inv, dtype=np.uint8).copy(),
    )
