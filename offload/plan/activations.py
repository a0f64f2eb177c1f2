"""What the planner knows of activations: the bytes a block's autograd graph saves, its compute,
and from them the recompute-or-keep choice that ``offload plan`` shows.

The saved bytes are counted, not guessed: one forward of a twin of the model, built on the meta
device in the compute dtype, runs under a ``saved_tensors_hooks`` pack hook that sees what the
first block's graph saves, without its weights and counting each storage once, as the runtime's
pack hook moves them (offload/engine/saved.py). Nothing is allocated. Attention is counted as
flash attention saves it (queries, keys, values, output and a float32 log-sum-exp per head and
token, and a mask if one is passed), since on the meta device scaled_dot_product_attention would
take its math path and save the whole score matrix; its output and log-sum-exp are what a block
that keeps only its attention holds (engine/attention.py), when the call has no mask and no
dropout. A model with eager attention keeps its score matrices, and they count. For Llama and
GPT-2 the count equals what the runtime moves (tests/test_plan_activations.py); a
sliding-window model's differs by what its real attention kernel keeps of the mask.

Compute is estimated from FLOPs: ``2 * parameters * tokens`` for the block's matmuls at the
matmul rate, plus ``2 * batch * seq^2 * hidden`` for causal attention at the attention rate;
backward counts twice the matmuls and 2.5 times the attention (flash attention's backward does
five matmuls of the forward's two). The rest of the block (norms and their float32 casts,
rotary embeddings, the activation function, residual additions) is bound by the device's
memory: the same meta run adds up the bytes each of those operations reads and writes
(``Counted.elementwise``: 605 KiB a token for the 6.7B Llama shape in bfloat16), which run at
the device memory's copy rate, twice as many in backward (an operation's backward reads the
gradient and what it saved and writes the inputs' gradients). Without that term the plan's
block was 12-21% faster than the H100 measured at 16K-32K tokens (6.7B shape), with it within
6%. The step's other GPU work is the head, ``6 * tokens * hidden * vocab``; the CPU optimizer
updates the streamed blocks (and host residents) at its rate. With
the boundary states on nvme, the disk writes every block's (padded to 4096 bytes) in forward and
reads them back in backward, at its rates: a phase lasts at least that long.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from offload.config import Config, Tier
from offload.engine.packing import Packing, storage_key
from offload.model.discovery import discover
from offload.plan.measure import Rates, measure_disk, measure_rates
from offload.plan.recompute import (
    BlockCost,
    Bounds,
    Choice,
    Keep,
    Link,
    Staging,
    choose,
    choose_staged,
    fixed,
)
from offload.plan.shape import ModelShape
from offload.plan.tally import ACTIVATION_STAGING, NVME_ALIGN, Settings, shard_numel

ASSUMED = Rates(
    h2d_bytes_s=25e9,
    d2h_bytes_s=25e9,
    flops=300e12,
    attention_flops=150e12,
    adam_params_s=5e9,
    disk_write_bytes_s=2e9,
    disk_read_bytes_s=2e9,
    memory_bytes_s=2e12,
)
"""Rates used when nothing can be measured (no CUDA device here, or --no-detect): a PCIe 4.0 x16
link as it is in practice, a GPU that sustains 300 TFLOPS in the block's matmuls and half that in
flash attention and whose memory moves 2 TB/s, a 16-core host whose fused CPU AdamW updates 5 G
parameters per second, and an NVMe drive that moves 2 GB/s each way (for boundary states on
nvme)."""

ALLOCATOR_SLACK = 0.12
"""What the caching allocator reserves beyond the plan's gpu need, as a share of it. The runtime
(offload/engine/choice.py, ``device_room``) measures the room for kept tensors from the reserved
peak; the plan's rows predict what tensors take (within about 1% of the allocated peak on the
H100), so its room takes this off too. Measured on the H100, 6.7B Llama recomputing every block:
7.7% at 16K tokens, 11.8% at 32K, 8.5% at 128K (benchmarks/results/activations_7b_*)."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class Counted:
    """What one block keeps for its backward, counted on the meta device."""

    saved: int
    """Bytes its autograd graph saves (weights excluded, storages once)."""
    attention: int
    """Bytes of its attention outputs and log-sum-exps; 0 when a call cannot keep them (a mask,
    dropout)."""
    elementwise: int = 0
    """Bytes its forward's other operations read and write (norms, casts, rotary embeddings,
    activation functions, residual additions): everything but the matmuls, attention and views.
    Memory-bound, they run at the device memory's rate, not the matmul rate."""


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


@contextlib.contextmanager
def _counting_attention(kept: list[int | None], traffic: _Traffic | None = None) -> Iterator[None]:
    """SDPA counted as flash attention; each call appends to kept the bytes of its output and
    log-sum-exp (None when it has a mask or dropout, which the runtime does not keep). traffic
    is paused during the call: the stand-in's operations are not the block's memory traffic
    (attention is counted in FLOPs)."""
    real = torch.nn.functional.scaled_dot_product_attention

    def flash_like(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        keepable = attn_mask is None and dropout_p == 0.0
        out = q.shape[:-1].numel() * v.shape[-1] * v.element_size()
        kept.append(out + q.shape[:-1].numel() * 4 if keepable else None)
        if traffic is None:
            return _FlashSaves.apply(q, k, v, attn_mask)
        traffic.paused = True
        try:
            return _FlashSaves.apply(q, k, v, attn_mask)
        finally:
            traffic.paused = False

    torch.nn.functional.scaled_dot_product_attention = flash_like  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


_COMPUTE_OPS = {"mm", "addmm", "bmm", "baddbmm"}  # counted as FLOPs (matmul_flops)
_VIEWS = {"_unsafe_view"}  # a view whose schema does not say so (it is not one for autograd)


class _Traffic(TorchDispatchMode):
    """Adds up the bytes each memory-bound operation reads and writes while ``on[0]`` is set:
    every operation but the matmuls, views (outputs that alias an input: nothing moves),
    factories (nothing read, and an empty tensor is not written), attention's stand-in, and the
    key-value cache's appends to its empty tensors (the counting run asks for a cache; training
    keeps none)."""

    def __init__(self, on: list[bool]) -> None:
        super().__init__()
        self.on = on
        self.paused = False  # set by attention's stand-in while it runs
        self.nbytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        schema = func._schema
        if (
            self.on[0]
            and not self.paused
            and name not in _COMPUTE_OPS
            and name not in _VIEWS
            and not any(r.alias_info is not None for r in schema.returns)
            and "empty" not in name
            and not (name == "cat" and bool(args) and any(t.numel() == 0 for t in args[0]))
        ):
            tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs))):
                self.nbytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count_block(
    model: nn.Module, dtype: str, batch_size: int, seq_len: int, blocks: str | None = None
) -> Counted:
    """What the first block keeps for a batch (see :class:`Counted`).

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
    attention: list[int | None] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and storage_key(t) not in keep:
            seen[(storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)] = t
        return t

    marks: list[int] = []  # where block 0's attention calls start and end

    def mark(inside_now: bool) -> Any:
        def hook(*_: Any) -> None:
            inside[0] = inside_now
            marks.append(len(attention))

        return hook

    traffic = _Traffic(inside)

    pre = block.register_forward_pre_hook(mark(True))
    post = block.register_forward_hook(mark(False))
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    try:
        with (
            torch.enable_grad(),
            _counting_attention(attention, traffic),
            saved_tensors_hooks(pack, lambda t: t),
            traffic,
        ):
            # With a cache, Hugging Face models skip the packed-sequence check that would read
            # the (meta) position ids; the cache only references keys and values: nothing saved.
            twin(input_ids=ids, use_cache=True)
    except Exception as e:  # an op without a meta kernel, a model that wants other inputs
        raise ValueError(f"could not run the model on the meta device: {type(e).__name__}: {e}") from None
    finally:
        pre.remove()
        post.remove()
    block_calls = attention[marks[0] : marks[1]]
    keepable = bool(block_calls) and all(n is not None for n in block_calls)
    return Counted(
        Packing(list(seen.values())).nbytes,
        sum(n or 0 for n in block_calls) if keepable else 0,
        traffic.nbytes,
    )


def saved_bytes_per_block(
    model: nn.Module, dtype: str, batch_size: int, seq_len: int, blocks: str | None = None
) -> int:
    """Bytes the first block's graph saves for a batch (weights excluded, storages once)."""
    return count_block(model, dtype, batch_size, seq_len, blocks).saved


def forward_flops(shape: ModelShape, batch_size: int, seq_len: int) -> float:
    """FLOPs of one block's forward (see the module docstring)."""
    return matmul_flops(shape, batch_size, seq_len) + attention_flops(shape, batch_size, seq_len)


def matmul_flops(shape: ModelShape, batch_size: int, seq_len: int) -> float:
    return 2.0 * shape.block_numel * batch_size * seq_len


def attention_flops(shape: ModelShape, batch_size: int, seq_len: int) -> float:
    """Causal attention's forward: half of the 4 batch seq^2 hidden of the full score matrix."""
    return 2.0 * batch_size * seq_len**2 * (shape.hidden_size or 0)


def block_cost(shape: ModelShape, counted: Counted, rates: Rates, batch_size: int, seq_len: int) -> BlockCost:
    """One block's estimated costs (see the module docstring)."""
    mm = matmul_flops(shape, batch_size, seq_len) / rates.flops
    att = attention_flops(shape, batch_size, seq_len) / rates.attention
    mem = counted.elementwise / rates.memory_bytes_s if rates.memory_bytes_s else 0.0
    return BlockCost(mm + att + mem, 2 * mm + 2.5 * att + 2 * mem, counted.saved, att, counted.attention)


def plan_rates(cfg: Config, detect: bool, notes: list[str], activations: Tier | None = None) -> Rates:
    """Measured rates when detecting on a CUDA machine, else the assumed ones (with a note). With
    the boundary states on nvme (activations: the plan's tier; None: placement.activations), the
    disk's too: measured in nvme_dirs[0] when detecting (on any machine), else assumed (a note
    either way)."""
    device = cfg.resolve_device()
    if detect and device.startswith("cuda"):
        measured = measure_rates(torch.device(device), _DTYPES[cfg.dtype])
        rates = replace(
            measured,
            disk_write_bytes_s=ASSUMED.disk_write_bytes_s,
            disk_read_bytes_s=ASSUMED.disk_read_bytes_s,
        )
        notes.append(f"offload_saved: measured {_rates(rates)}")
    else:
        rates = ASSUMED
        notes.append(
            f"offload_saved: assumed {_rates(ASSUMED)} (nothing measured; see --link-gbs, --tflops, --adam-gps, --memory-gbs)"
        )
    if (cfg.placement.activations if activations is None else activations) is Tier.NVME:
        rates = _disk_rates(cfg, detect, rates, notes)
    return rates


def _disk_rates(cfg: Config, detect: bool, rates: Rates, notes: list[str]) -> Rates:
    """rates with the disk's measured in nvme_dirs[0] when detecting and it can be, else as they
    are (assumed), with a note saying which and why."""
    why = "detection is off"
    if detect and cfg.nvme_dirs:
        try:
            write, read = measure_disk(cfg.nvme_dirs[0])
        except OSError as e:
            why = f"nvme_dirs[0] could not be measured: {e}"
        else:
            notes.append(
                f"offload_saved: measured the disk of nvme_dirs[0] ({cfg.nvme_dirs[0]}) for the boundary "
                f"states: {write / 1e9:.1f} GB/s writing, {read / 1e9:.1f} GB/s reading"
            )
            return replace(rates, disk_write_bytes_s=write, disk_read_bytes_s=read)
    notes.append(
        f"offload_saved: assumed the disk at {_gbs(rates.disk_write_bytes_s)} writing, "
        f"{_gbs(rates.disk_read_bytes_s)} reading for the boundary states ({why}; see --disk-gbs)"
    )
    return rates


def _gbs(rate: float | None) -> str:
    return "(not counted)" if rate is None else f"{rate / 1e9:.1f} GB/s"


@dataclass(frozen=True, slots=True)
class Room:
    """What the choice may use and what else the step does (from the planner's tally)."""

    device_bytes: int | None
    """Device memory free for kept tensors: the gpu budget less the plan's gpu column and the
    margin (None: unbounded)."""
    host_bytes: int | None
    """Host memory free for host-kept tensors (None: unbounded)."""
    link: Link
    """The host link with the step's other traffic (weights, gradients, boundary states)."""
    cpu_params: int
    """Parameters the CPU optimizer updates each step."""
    disk_forward_s: float = 0.0
    """The disk's time to write the boundary states in forward (activations nvme; else 0)."""
    disk_backward_s: float = 0.0
    """... to read them back in backward."""
    staging: Staging | None = None
    """The NVMe store's staging leases and the disk's time per group (activations nvme with the
    disk's rates; else None): offload_saved auto sizes them with the keeps."""
    residents_s: float = 0.0
    """The CPU's update of the residents when they live in host memory, and their upload: their
    gradients land at the end of backward (the embedding's last) and the next forward needs
    them first, so the device waits for all of it (:func:`update_wait`)."""
    first_block_s: float = 0.0
    """The first streamed block's gradient down, update and weights up: its gradient lands when
    its backward ends, and only the device blocks' backward and forward run between that and
    its next forward (0: no block streams)."""
    device_blocks: int = 0
    """Blocks whose state is on the device: their backward and forward hide the first streamed
    block's update."""


def choice_room(
    shape: ModelShape,
    s: Settings,
    need: dict[Tier, int],
    budgets: dict[Tier, int | None],
    rates: Rates,
    margin: int,
) -> Room:
    """The Room of a plan's settings s, whose predicted peaks are need: the gpu budget less need,
    the allocator's slack over it (ALLOCATOR_SLACK) and margin, the host budget less need, the link's weight uploads (both phases), gradients
    (backward) and boundary states (host or nvme activations), the parameters the CPU updates
    (the streamed blocks' shards and, on the host, the residents), and with nvme activations the
    disk's time for every block's boundary state (padded as the store writes it) each way at the
    rates' disk rates (None: not counted)."""
    per_block = s.batch_size * s.seq_len * (shape.hidden_size or 0) * s.item
    boundary = 0 if s.activations is Tier.GPU else shape.blocks * per_block
    on_disk = shape.blocks * -(-per_block // NVME_ALIGN) * NVME_ALIGN if s.activations is Tier.NVME else 0
    streamed_blocks = shape.blocks - min(s.device_blocks, shape.blocks)
    streamed = streamed_blocks * shape.block_numel * s.item
    link = Link(
        rates.h2d_bytes_s,
        rates.d2h_bytes_s,
        h2d_forward=streamed,
        h2d_backward=streamed + boundary,
        d2h_forward=boundary,
        d2h_backward=streamed,
        duplex_bytes_s=rates.duplex_bytes_s,
    )
    gpu, host = budgets[Tier.GPU], budgets[Tier.HOST]
    residents = 0 if s.residents_on_device else shape.resident_numel
    staging = None
    if on_disk and rates.disk_write_bytes_s and rates.disk_read_bytes_s:
        lease = on_disk // shape.blocks
        staging = Staging(
            leases=min(shape.blocks, ACTIVATION_STAGING),
            lease_bytes=lease,
            groups=shape.blocks,
            write_s=lease / rates.disk_write_bytes_s,
            read_s=lease / rates.disk_read_bytes_s,
        )
    adam = rates.adam_params_s
    shard = shard_numel(shape.block_numel, s.world)
    first = 0.0
    if streamed_blocks and adam:
        wire = shard * s.item
        first = shard / adam + _both_ways(wire, rates)
    return Room(
        device_bytes=None if gpu is None else max(gpu - margin - reserved_for(need[Tier.GPU]), 0),
        host_bytes=None if host is None else max(host - need[Tier.HOST], 0),
        link=link,
        cpu_params=streamed_blocks * shard + residents,
        disk_forward_s=_seconds(on_disk, rates.disk_write_bytes_s),
        disk_backward_s=_seconds(on_disk, rates.disk_read_bytes_s),
        staging=staging,
        residents_s=residents / adam + _both_ways(residents * s.item, rates) if adam else 0.0,
        first_block_s=first,
        device_blocks=min(s.device_blocks, shape.blocks),
    )


def _both_ways(nbytes: int, rates: Rates) -> float:
    """A gradient of nbytes down and the weights it updates back up, one after the other."""
    return nbytes / rates.d2h_bytes_s + nbytes / rates.h2d_bytes_s


def update_wait(room: Room, cost: BlockCost) -> float:
    """Seconds the device waits between backward and the next forward for the CPU updates that
    forward needs first: the residents' (in host memory), then the first streamed block's less
    what the device blocks before it hide (their backward and forward, cost each)."""
    hidden = room.device_blocks * (cost.forward_s + cost.backward_s)
    return room.residents_s + max(room.first_block_s - hidden, 0.0)


def reserved_for(need: int) -> int:
    """What the caching allocator reserves for need bytes of tensors at the step's peak."""
    return need + int(need * ALLOCATOR_SLACK)


def _seconds(nbytes: int, rate: float | None) -> float:
    return 0.0 if rate is None or nbytes == 0 else nbytes / rate


def recompute_choice(
    model: nn.Module,
    shape: ModelShape,
    cfg: Config,
    *,
    batch_size: int,
    seq_len: int,
    room: Room,
    rates: Rates,
    blocks: str | None = None,
    counted: Counted | None = None,
) -> tuple[Choice, Counted]:
    """The choice ``placement.offload_saved`` makes on this model (auto: the cost model's; a
    list, a mapping or always: that one, with its estimate), and what one block keeps (counted
    here unless given)."""
    if counted is None:
        counted = count_block(model, cfg.dtype, batch_size, seq_len, blocks)
    costs = [block_cost(shape, counted, rates, batch_size, seq_len)] * shape.blocks
    head = 6.0 * batch_size * seq_len * (shape.hidden_size or 0) * (shape.vocab_size or 0) / rates.flops
    cpu = room.cpu_params / rates.adam_params_s if rates.adam_params_s else 0.0
    bounds = Bounds(
        cpu_s=cpu,
        other_s=head,
        disk_forward_s=room.disk_forward_s,
        disk_backward_s=room.disk_backward_s,
        wait_s=update_wait(room, costs[0]),
    )
    spec = cfg.placement.offload_saved
    if spec == "auto" and room.staging is not None:
        return choose_staged(
            costs, room.link, room.host_bytes, room.device_bytes, bounds, room.staging
        ), counted
    if spec == "auto":
        return choose(costs, room.link, room.host_bytes, room.device_bytes, bounds), counted
    return fixed(costs, room.link, keep_of(spec, shape.blocks), bounds), counted


def keep_of(spec: Any, blocks: int) -> list[Keep]:
    """Per block, what a fixed placement.offload_saved keeps: "always" every graph in host
    memory, a list those blocks', a mapping {kind: [blocks]} each kind's (out-of-range blocks
    ignored: the runtime refuses them)."""
    if spec == "always":
        return [Keep.HOST] * blocks
    if isinstance(spec, list):
        spec = {"host": spec}
    keep = [Keep.RECOMPUTE] * blocks
    if isinstance(spec, dict):
        for kind, listed in spec.items():
            for i in listed:
                if i < blocks:
                    keep[i] = Keep(kind)
    return keep


def _rates(r: Rates) -> str:
    both = "" if r.duplex_bytes_s is None else f", {r.duplex_bytes_s / 1e9:.1f} GB/s both ways"
    adam = "" if r.adam_params_s is None else f", CPU AdamW {r.adam_params_s / 1e9:.1f} G params/s"
    memory = "" if r.memory_bytes_s is None else f", device memory {r.memory_bytes_s / 1e12:.2f} TB/s"
    return (
        f"host link {r.h2d_bytes_s / 1e9:.1f} GB/s to the device, {r.d2h_bytes_s / 1e9:.1f} GB/s back{both}, "
        f"matmul {r.flops / 1e12:.0f} TFLOPS, attention {r.attention / 1e12:.0f} TFLOPS{memory}{adam}"
    )
