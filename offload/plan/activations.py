"""What the planner knows of activations: the bytes a block's autograd graph saves, its compute,
and from them the recompute-or-offload choice that ``offload plan`` shows.

The saved bytes are counted, not guessed: one forward of a twin of the model, built on the meta
device in the compute dtype, runs under a ``saved_tensors_hooks`` pack hook that sees what the
first block's graph saves, without its weights and counting each storage once, as the runtime's
pack hook moves them (offload/engine/saved.py). Nothing is allocated. Attention is counted as
flash attention saves it (queries, keys, values, output and a float32 log-sum-exp per head and
token, and a mask if one is passed), since on the meta device scaled_dot_product_attention would
take its math path and save the whole score matrix. A model with eager attention keeps its score
matrices, and they count. For Llama and GPT-2 the count equals what the runtime moves
(tests/test_plan_activations.py); a sliding-window model's differs by what its real attention
kernel keeps of the mask.

Compute is estimated from FLOPs: ``2 * parameters * tokens`` for the block's matmuls plus
``2 * batch * seq^2 * hidden`` for causal attention, at the measured (or assumed) matmul rate;
backward counts twice the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from offload.config import Config
from offload.engine.packing import Packing, storage_key
from offload.model.discovery import discover
from offload.plan.measure import Rates, measure_rates
from offload.plan.recompute import BlockCost, Choice, Link, choose, step_time
from offload.plan.shape import ModelShape

ASSUMED = Rates(h2d_bytes_s=25e9, d2h_bytes_s=25e9, flops=300e12)
"""Rates used when nothing can be measured (no CUDA device here, or --no-detect): a PCIe 4.0 x16
link as it is in practice, and a GPU that sustains 300 TFLOPS in the block's matmuls."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _FlashSaves(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting: saves what flash attention
    saves (and an explicit mask, which the kernels that take one keep), not the score matrix."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # Laid out (batch, seq, heads, dim) as flash kernels return it, so the usual transpose
        # back is a view of it and the output projection's saved input shares its storage.
        b, h, n, _ = q.shape
        out = q.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _flash_like(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    return _FlashSaves.apply(q, k, v, attn_mask)


@contextlib.contextmanager
def _counting_attention() -> Iterator[None]:
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def saved_bytes_per_block(
    model: nn.Module, dtype: str, batch_size: int, seq_len: int, blocks: str | None = None
) -> int:
    """Bytes the first block's graph saves for a batch (weights excluded, storages once).

    Raises ValueError when the model cannot be rebuilt and run on the meta device."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("the model has no config to rebuild it on the meta device")
    with torch.device("meta"):
        twin = type(model)(config).to(_DTYPES[dtype])
    block = discover(twin, blocks).blocks[0]
    keep = {storage_key(p) for p in block.parameters()} | {storage_key(b) for b in block.buffers()}
    seen: dict[tuple, torch.Tensor] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and storage_key(t) not in keep:
            seen[(storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)] = t
        return t

    pre = block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    post = block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.enable_grad(), _counting_attention(), saved_tensors_hooks(pack, lambda t: t):
            # With a cache, Hugging Face models skip the packed-sequence check that would read
            # the (meta) position ids; the cache only references keys and values: nothing saved.
            twin(input_ids=ids, use_cache=True)
    except Exception as e:  # an op without a meta kernel, a model that wants other inputs
        raise ValueError(f"could not run the model on the meta device: {type(e).__name__}: {e}") from None
    finally:
        pre.remove()
        post.remove()
    return Packing(list(seen.values())).nbytes


def forward_flops(shape: ModelShape, batch_size: int, seq_len: int) -> float:
    """FLOPs of one block's forward (see the module docstring)."""
    tokens = batch_size * seq_len
    return 2.0 * shape.block_numel * tokens + 2.0 * batch_size * seq_len**2 * (shape.hidden_size or 0)


def plan_rates(cfg: Config, detect: bool, notes: list[str]) -> Rates:
    """Measured rates when detecting on a CUDA machine, else the assumed ones (with a note)."""
    device = cfg.resolve_device()
    if detect and device.startswith("cuda"):
        rates = measure_rates(torch.device(device), _DTYPES[cfg.dtype])
        notes.append(f"offload_saved: measured {_rates(rates)}")
        return rates
    notes.append(f"offload_saved: assumed {_rates(ASSUMED)} (nothing measured; see --link-gbs, --tflops)")
    return ASSUMED


def recompute_choice(
    model: nn.Module,
    shape: ModelShape,
    cfg: Config,
    *,
    batch_size: int,
    seq_len: int,
    link: Link,
    rates: Rates,
    host_bytes: int | None,
    blocks: str | None = None,
) -> tuple[Choice, int]:
    """The choice ``placement.offload_saved`` makes on this model (auto: the cost model's; a list
    or always: that one, with its estimate), and the saved bytes of one block."""
    saved = saved_bytes_per_block(model, cfg.dtype, batch_size, seq_len, blocks)
    fwd = forward_flops(shape, batch_size, seq_len) / rates.flops
    costs = [BlockCost(fwd, 2 * fwd, saved)] * shape.blocks
    spec = cfg.placement.offload_saved
    if spec == "auto":
        return choose(costs, link, host_bytes), saved
    flags = tuple(True for _ in costs) if spec == "always" else tuple(i in spec for i in range(len(costs)))
    recompute = step_time(costs, link, [False] * len(costs))
    return Choice(flags, step_time(costs, link, flags), recompute, saved * sum(flags)), saved


def _rates(r: Rates) -> str:
    return (
        f"host link {r.h2d_bytes_s / 1e9:.1f} GB/s to the device, {r.d2h_bytes_s / 1e9:.1f} GB/s back, "
        f"matmul {r.flops / 1e12:.0f} TFLOPS"
    )
