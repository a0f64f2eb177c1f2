"""Fused CPU AdamW over flat host buffers: the facade over ``offload._C.adamw_step``.

One pass per element reads the gradient (bf16 or fp32), the fp32 master weight and both Adam
moments, writes back all three and the bf16 wire copy of the new weight. With bf16 gradients that
moves 28 bytes per parameter, where torch needs three passes over memory: the gradient upcast,
``torch._fused_adamw_`` and the downcast of the master to the wire dtype. The math is torch's fused
CPU AdamW (decoupled weight decay, bias-corrected moments) rounding for rounding; the C++ core
(``csrc/core/adamw.cpp``) says where exactly it matches torch and the one place torch disagrees
with itself. It is the only engine module that imports ``_C``.
"""

from __future__ import annotations

import itertools

import torch

from offload import _C


def _check(name: str, t: object, dtypes: tuple[torch.dtype, ...], numel: int | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU; got device {t.device}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must be {want}; got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; got stride {t.stride()}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements; master has {numel}")
    return t


def _check_disjoint(named: dict[str, torch.Tensor]) -> None:
    """The kernel reads and writes through restrict pointers: no two buffers may share a byte."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
        for name, t in named.items()
        if t.numel()
    )
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"{a} and {b} overlap in memory; the update needs separate buffers")


def fused_adamw_(
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    wire: torch.Tensor | None = None,
    threads: int | None = None,
) -> None:
    """One AdamW step over ``master`` in place, as ``torch._fused_adamw_`` on ``grad * grad_scale``.

    master, exp_avg, exp_avg_sq: 1-D contiguous float32 CPU tensors of one size, updated in place.
    grad: float32 or bfloat16, same size; bf16 is upcast exactly, then multiplied by grad_scale
    (the clipping coefficient; 1.0 for none). step: the step being taken, already incremented (1
    on the first update). wire: optional bfloat16 tensor of the same size that receives
    ``master.to(torch.bfloat16)`` of the updated weights. threads: worker threads for this call
    (default ``torch.get_num_threads()``); the result does not depend on it. Releases the GIL.
    """
    _check("master", master, (torch.float32,), None)
    n = master.numel()
    _check("exp_avg", exp_avg, (torch.float32,), n)
    _check("exp_avg_sq", exp_avg_sq, (torch.float32,), n)
    _check("grad", grad, (torch.float32, torch.bfloat16), n)
    buffers = {"master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "grad": grad}
    if wire is not None:
        buffers["wire"] = _check("wire", wire, (torch.bfloat16,), n)
    _check_disjoint(buffers)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (already incremented); got {step!r}")
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1; got {threads!r}")
    _C.adamw_step(
        master.data_ptr(),
        exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(),
        grad.data_ptr(),
        grad.dtype == torch.bfloat16,
        0 if wire is None else wire.data_ptr(),
        n,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        step,
        float(grad_scale),
        threads,
    )
