"""Keep a block's attention output and log-sum-exp, so its recompute skips the attention forward.

A recomputed block runs its whole forward again in backward. At long sequences most of that is
attention, whose cost grows with the square of the sequence, while what it produces is small:
its output (one hidden-wide tensor) and the log-sum-exp of each row of scores (one float per
head and token). Flash attention's backward needs exactly those, with the queries, keys and
values, which are cheap to recompute. So for the blocks that keep their attention
(``Keep.ATTENTION`` on the device, ``Keep.ATTENTION_HOST`` in pinned host memory):

- forward runs the block under :class:`Capture`, a ``TorchFunctionMode`` that computes each
  ``scaled_dot_product_attention`` call with the fused kernel the dispatcher would have picked,
  called directly so that it returns its log-sum-exp too, and keeps both;
- the recompute runs under :class:`Replay`, which answers each attention call with the kept
  output through :class:`_KeptAttention`, whose backward calls the kernel's own backward with
  the kept output and log-sum-exp, as autograd would have.

The recomputed queries, keys and values are bitwise those of the forward (the recompute is
exact), and the kernel and its arguments are the ones the dispatcher uses, so gradients are
bitwise those of a plain recompute (``tests/test_attention_keep.py``). A call is kept only when
its kernel is flash attention (CUDA, or the CPU's flash kernel) or cuDNN attention (where the
dispatcher picks it: Hopper), with no mask and no dropout, and on CUDA a head size that needs no
padding; grouped queries where the dispatcher picks cuDNN run flash (to the two kernels'
rounding). Any other call is recomputed as usual (a ``None`` in the block's records), and
:class:`Probe` says in the measuring step which blocks can keep. The kept call runs the kernel
the dispatcher picked rather than another that could run it: their speeds differ, most in
backward at long sequences, and the keep's gain is measured against the dispatcher's kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from offload.engine.activations import HostKept, KeptStore, Stored
from offload.engine.device import Device

SDPA = torch.nn.functional.scaled_dot_product_attention
FLASH, CUDNN = 1, 3  # torch.nn.attention.SDPBackend's values, as torch._fused_sdp_choice returns them


def _flash_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, gqa: bool) -> bool:
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, causal, gqa)))


@dataclass(frozen=True, slots=True)
class _Options:
    """One scaled_dot_product_attention call's arguments besides the query, key and value."""

    mask: Any
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool

    @staticmethod
    def parse(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Options]:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        given = dict(zip(names, args))
        given.update(kwargs)
        opts = _Options(
            given.get("attn_mask"),
            float(given.get("dropout_p", 0.0)),
            bool(given.get("is_causal", False)),
            given.get("scale"),
            bool(given.get("enable_gqa", False)),
        )
        return given["query"], given["key"], given["value"], opts

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int | None:
        """The fused kernel the dispatcher would run here (FLASH or CUDNN), None where the call
        cannot be kept: a mask, dropout, a head size to pad, or another kernel."""
        if self.mask is not None or self.dropout_p != 0.0 or q.dim() != 4:
            return None
        if q.is_cuda and q.shape[-1] % 8:
            return None  # the CUDA path would pad the head size: not the kernel called below
        choice = int(
            torch._fused_sdp_choice(
                q, k, v, None, 0.0, self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa
            )
        )
        if choice == FLASH or (choice == CUDNN and q.is_cuda and not self.enable_gqa):
            return choice
        # Grouped queries where the dispatcher picks cuDNN: its kernel is not called directly
        # here (how the dispatcher feeds it the grouped keys is its own), so flash runs the call
        # where it can (enable_flash_sdp and sdpa_kernel are checked too), to its rounding.
        if choice == CUDNN and q.is_cuda and _flash_can_run(q, k, v, self.is_causal, self.enable_gqa):
            return FLASH
        return None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
        """(output, tensors the backward needs besides q, k, v and the output, other values),
        from the kernel's forward called as the dispatcher calls it."""
        if kernel == CUDNN:
            out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
                torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, self.is_causal, False, scale=self.scale
                )
            )
            # Sizes, and tensors that are empty or undefined without dropout and nesting.
            return out, [lse], [cum_q, cum_k, max_q, max_k, seed, offset]
        if q.is_cuda:
            out, lse, *rest = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, self.is_causal, False, scale=self.scale
            )
            # cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused: as for cuDNN above.
            return out, [lse], rest[:6]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, self.is_causal, scale=self.scale
        )
        return out, [lse], []

    def backward(
        self, grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: Kept
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's backward, called as autograd's derivative of the forward above calls it."""
        (lse,) = kept.tensors
        if kept.kernel == CUDNN:
            cum_q, cum_k, max_q, max_k, seed, offset = kept.values
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad, q, k, v, kept.out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0,
                self.is_causal, scale=self.scale,
            )  # fmt: skip
        if q.is_cuda:
            cum_q, cum_k, max_q, max_k, seed, offset = kept.values
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad, q, k, v, kept.out, lse, cum_q, cum_k, max_q, max_k, 0.0, self.is_causal, seed,
                offset, scale=self.scale,
            )  # fmt: skip
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, kept.out, lse, 0.0, self.is_causal, scale=self.scale
        )


@dataclass(slots=True, eq=False)
class Kept:
    """One kept attention call: its output, the log-sum-exp, the kernel's other values (on CUDA
    its sizes and the small or undefined tensors it returns; they never leave the device), and
    which kernel ran it (FLASH or CUDNN)."""

    out: torch.Tensor
    tensors: list[torch.Tensor]
    values: list[Any]
    kernel: int = FLASH

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.out, *self.tensors])


class Capture(TorchFunctionMode):
    """Forward of a block that keeps its attention: each call's output and log-sum-exp are kept
    in ``records`` (None for a call that cannot be kept, computed as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Kept | None] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        q, k, v, opts = _Options.parse(*args, **kwargs)
        kernel = opts.kernel(q, k, v)
        if kernel is None:
            self.records.append(None)
            return func(*args, **kwargs)
        out, tensors, values = opts.forward(q, k, v, kernel)
        self.records.append(Kept(out, tensors, values, kernel))
        return out


class _KeptAttention(torch.autograd.Function):
    """An attention call answered from its kept output; backward is the kernel's backward."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: _Options, kept: Kept
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.opts, ctx.kept = opts, kept
        # A new tensor object on the kept output's memory: the graph's output, while the kept
        # one stays what the backward kernel reads.
        return kept.out.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        dq, dk, dv = ctx.opts.backward(grad, q, k, v, ctx.kept)
        ctx.kept = None  # the kept output and log-sum-exp are not needed again
        return dq, dk, dv, None, None


class Replay(TorchFunctionMode):
    """Recompute of a block that kept its attention: the calls are answered from records, in
    order; a None record (a call not kept) is computed."""

    def __init__(self, records: list[Kept | None], index: int) -> None:
        super().__init__()
        self.records = records
        self.index = index
        self.pos = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        if self.pos >= len(self.records):
            raise RuntimeError(
                f"block {self.index}'s recompute made more attention calls than its forward "
                f"({len(self.records)}): the block must run the same calls each time"
            )
        kept = self.records[self.pos]
        self.pos += 1
        if kept is None:
            return func(*args, **kwargs)
        q, k, v, opts = _Options.parse(*args, **kwargs)
        want = (*q.shape[:-1], v.shape[-1])
        if tuple(kept.out.shape) != want:
            raise RuntimeError(
                f"block {self.index}'s recompute calls attention with shape {want}, its forward "
                f"kept {tuple(kept.out.shape)}"
            )
        return _KeptAttention.apply(q, k, v, opts, kept)


class Probe(TorchFunctionMode):
    """The measuring step's forward: times each attention call (CUDA events on the current
    stream, the host clock on the CPU) and counts what keeping it would hold, without changing
    what runs. ``keepable`` turns False at the first call that could not be kept."""

    def __init__(self, cuda: bool) -> None:
        super().__init__()
        self.cuda = cuda
        self.spans: list[tuple[Any, Any]] = []
        self.nbytes = 0
        self.keepable = True
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        q, k, v, opts = _Options.parse(*args, **kwargs)
        self.calls += 1
        self.keepable = self.keepable and opts.kernel(q, k, v) is not None
        start = self._mark()
        out = func(*args, **kwargs)
        self.spans.append((start, self._mark()))
        # The output and a float32 log-sum-exp per head and query.
        self.nbytes += out.numel() * out.element_size() + q.shape[:-1].numel() * 4
        return out

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self) -> float:
        """Time in the attention calls (the events must have completed)."""
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        return float(sum(b - a for a, b in self.spans))


@dataclass(slots=True, eq=False)
class KeptGroup:
    """One block's kept attention: the records on the device, or their tensors in a store."""

    records: list[Kept | None]
    """On the device (empty once put in a store)."""
    stored: Stored | None = None
    values: list[tuple[int, list[Any], int] | None] = field(default_factory=list)
    """Stored: per call, None (not kept) or (tensors it put, its kernel's other values, kernel)."""


class AttentionKeep(HostKept):
    """Where the kept attention of each block waits: on the device, or for ``Keep.ATTENTION_HOST``
    in pinned host memory (a :class:`HostStore` with one copy out in flight and one group
    coming back ahead, as the planner counts: offload.plan.recompute.SAVED_WINDOW)."""

    def __init__(self, device: Device, blocks: int) -> None:
        self.device = device
        self.blocks = blocks
        self._host = KeptStore(device, blocks, "kept-attention")

    def capture(self) -> Capture:
        return Capture()

    def put(self, index: int, records: list[Kept | None], host: bool) -> KeptGroup:
        """Block index's kept records, left on the device or (host) copied out to a store."""
        if not host:
            return KeptGroup(records)
        tensors = [t for r in records if r is not None for t in (r.out, *r.tensors)]
        values = [None if r is None else (1 + len(r.tensors), r.values, r.kernel) for r in records]
        return KeptGroup([], self.store.put(index, tensors), values)

    def get(self, group: KeptGroup) -> list[Kept | None]:
        """The records back on the device (for a stored group: fetched, the next one coming)."""
        if group.stored is None:
            return group.records
        tensors = iter(self.store.get(group.stored))
        group.stored = None
        out: list[Kept | None] = []
        for v in group.values:
            if v is None:
                out.append(None)
                continue
            mine = [next(tensors) for _ in range(v[0])]
            out.append(Kept(mine[0], mine[1:], v[1], v[2]))
        return out
