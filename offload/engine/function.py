"""The autograd Function of one streamed block, and the proxy module that stands in its place.

The model's own forward loop keeps calling ``self.layers[i](hidden, **kwargs)``; each proxy
routes the call to the executor. With autograd on, the call is a BlockFunction. By default its
forward runs without autograd, handing the block's inputs (the boundary state) to the activation
store of ``placement.activations``, and its backward fetches them back and recomputes the block.
``placement.offload_saved`` chooses per block what else it keeps (offload.plan.recompute.Keep):
its whole graph, on the device or with its saved tensors in host memory, and then the backward
runs that graph (saved.py); or its attention's output, and then the recompute skips the
attention forward (attention.py).
Arguments and outputs may be any nesting of tuples, lists and dicts; tensors among them that
require grad get gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from offload.config import Config, Tier
from offload.engine.activations import ActivationStore, DeviceStore, make_store
from offload.engine.activations_nvme import NvmeStore
from offload.engine.attention import AttentionKeep, Capture, Replay
from offload.engine.choice import Chooser, MeasuredChoice, Traffic, host_room, make_choice
from offload.engine.executor import Executor
from offload.engine.saved import SavedTensors, weight_keys
from offload.engine.updater import Updater
from offload.plan.recompute import Keep

ARGS = 6  # BlockFunction.apply's arguments before the flat inputs


def _is_leaf(x: Any) -> bool:
    # Only containers are traversed: objects such as a KV cache pass through whole.
    return not isinstance(x, (list, tuple, dict))


@dataclass(slots=True)
class Activations:
    """What a block keeps for its backward: the boundary-state store (``placement.activations``)
    and, for the blocks that keep more (``placement.offload_saved``), their graphs or their
    attention."""

    boundary: ActivationStore
    saved: SavedTensors | None = None
    attention: AttentionKeep | None = None
    choose: Chooser | None = None
    measure: MeasuredChoice | None = None
    """offload_saved auto (it measures its second pass, then decides)."""

    def keep(self, index: int) -> Keep:
        return Keep.RECOMPUTE if self.choose is None else self.choose(index)

    def offloads(self, index: int) -> bool:
        """Whether block index keeps anything besides its boundary state."""
        return self.keep(index) is not Keep.RECOMPUTE

    def forward_mode(self, index: int, keep: Keep) -> Any:
        """The mode block index's recomputable forward runs in: capturing its attention, probing
        it (auto's measuring step), or none."""
        if keep.attention:
            return Capture()
        m = self.measure
        return m.probing(index) if m is not None and m.measuring else contextlib.nullcontext()

    def counting(self, index: int) -> Any:
        m = self.measure
        return m.counting(index) if m is not None and m.measuring else contextlib.nullcontext()

    def backward_done(self, index: int, began: Any) -> None:
        """Block index's backward is queued, and the upload of the next block's weights: the
        paced host stores queue the next parts of the groups coming back (behind that upload,
        from began, the compute stream's event where the block's backward began:
        engine/activations.py), and auto counts the block's pass."""
        for owner in (self.saved, self.attention):
            if owner is not None:
                owner.pace(index, began)
        if self.measure is not None:
            self.measure.done(index)

    def stored_bytes(self) -> int:
        """Host bytes of kept graphs and attention outputs now."""
        saved = 0 if self.saved is None else self.saved.stored_bytes()
        return saved + (0 if self.attention is None else self.attention.stored_bytes())

    def close(self) -> None:
        self.boundary.close()
        if self.saved is not None:
            self.saved.close()
        if self.attention is not None:
            self.attention.close()


def make_activations(
    cfg: Config,
    executor: Executor,
    updater: Updater | None = None,
    device_need: int = 0,
    activations: Tier | None = None,
) -> Activations:
    """The Activations of cfg.placement for executor's blocks; updater's busy time is the CPU
    bound of offload_saved auto (None: not counted); device_need the plan's gpu bytes besides
    the kept tensors (their room on the CPU is budgets.gpu_bytes less it); activations the
    boundary states' tier, the plan's (None: placement.activations). Sets (or clears) the
    executor's timer."""
    p, device, blocks = cfg.placement, executor.device, len(executor.blocks)
    # NVMe staging grows by itself unless auto's cost model sizes it with the keeps.
    room = None if p.offload_saved == "auto" else (lambda: host_room(cfg.budgets))
    boundary = make_store(activations or p.activations, device, blocks, cfg.nvme_dirs, room)
    streamed = len(executor.streamed) * executor.slots.buffers[0].nbytes
    nvme = boundary if isinstance(boundary, NvmeStore) else None
    traffic = Traffic(streamed, streamed, staging=nvme)
    keys = lambda: weight_keys(executor)  # noqa: E731
    busy = None if updater is None else (lambda: updater.busy_s)
    choose = make_choice(p.offload_saved, device, blocks, traffic, keys, cfg.budgets, busy, device_need)
    measure = choose if isinstance(choose, MeasuredChoice) else None
    executor.timer = None if measure is None else measure.timer
    if choose is None:
        return Activations(boundary)
    return Activations(boundary, SavedTensors(device, blocks), AttentionKeep(device, blocks), choose, measure)


class BlockFunction(torch.autograd.Function):
    """One block: ``apply(executor, activations, index, spec, box, token, *flat_inputs)``.

    ``token`` is a zero-size tensor that requires grad, so the block is in the autograd graph
    (and its weights get gradients) even when none of its inputs requires grad.
    """

    @staticmethod
    def forward(
        ctx: Any,
        executor: Executor,
        acts: Activations,
        index: int,
        spec: Any,
        box: dict,
        token: Any,
        *flat: Any,
    ) -> Any:
        ctx.executor, ctx.acts, ctx.index, ctx.spec = executor, acts, index, spec
        keep = acts.keep(index)
        ctx.offloaded = keep.graph
        ctx.attention = None
        if keep.graph:
            assert acts.saved is not None
            needs = ctx.needs_input_grad[ARGS:]
            out, ctx.kept = acts.saved.forward(executor, index, keep, spec, flat, needs)
            out_flat, box["spec"] = pytree.tree_flatten(out, is_leaf=_is_leaf)
            return tuple(ctx.kept.take_outputs(out_flat))
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        ctx.rng = executor.device.rng_state()  # the recompute must draw the same random numbers
        ctx.tensor_pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in flat]
        # Before the block computes: a copy out overlaps its compute.
        ctx.stored = acts.boundary.put(index, [flat[i] for i in ctx.tensor_pos])
        if acts.measure is not None and not isinstance(acts.boundary, DeviceStore):
            acts.measure.add_boundary(index, sum(flat[i].nbytes for i in ctx.tensor_pos))
        with acts.forward_mode(index, keep) as mode:
            out = executor.forward_block(index, args, kwargs)
        if keep.attention:
            assert acts.attention is not None
            ctx.attention = acts.attention.put(index, mode.records, keep.on_host)
        out_flat, box["spec"] = pytree.tree_flatten(out, is_leaf=_is_leaf)
        return tuple(out_flat)

    @staticmethod
    def backward(ctx: Any, *grad_outs: Any) -> Any:
        executor: Executor = ctx.executor
        began = executor.device.event(executor.device.compute_stream())
        nflat = len(ctx.needs_input_grad) - ARGS
        result: list[Any] = [None] * nflat
        if ctx.offloaded:
            if ctx.kept is None:
                raise RuntimeError(
                    f"block {ctx.index}'s graph was already run by a backward: a second backward "
                    "(retain_graph=True) is not supported for blocks in placement.offload_saved"
                )
            for pos, g in ctx.acts.saved.backward(executor, ctx.kept, grad_outs).items():
                result[pos] = g
            ctx.kept = None
            ctx.acts.backward_done(ctx.index, began)  # auto counts the passes of its choice too
            return (*[None] * ARGS, *result)
        flat = list(ctx.others)
        needs = ctx.needs_input_grad[ARGS:]
        inputs: list[torch.Tensor] = []
        want: list[int] = []
        saved = ctx.acts.boundary.get(ctx.stored)
        for pos, t in zip(ctx.tensor_pos, saved):
            t = t.detach()
            if needs[pos]:
                t.requires_grad_(True)
                inputs.append(t)
                want.append(pos)
            flat[pos] = t
        args, kwargs = pytree.tree_unflatten(flat, ctx.spec)
        acts: Activations = ctx.acts
        replay: Any = contextlib.nullcontext()
        if ctx.attention is not None:
            assert acts.attention is not None
            replay = Replay(acts.attention.get(ctx.attention), ctx.index)
            ctx.attention = None

        def run() -> list[Any]:
            with executor.device.fork_rng(), acts.counting(ctx.index), replay:
                executor.device.set_rng_state(ctx.rng)
                out = executor.template(*args, **kwargs)
            return pytree.tree_leaves(out, is_leaf=_is_leaf)

        input_grads = executor.backward_block(ctx.index, run, inputs, list(grad_outs))
        acts.backward_done(ctx.index, began)
        for pos, g in zip(want, input_grads):
            result[pos] = g
        return (*[None] * ARGS, *result)


def _is_cache(x: Any) -> bool:
    # A KV cache (transformers' Cache classes): identified by shape of API, not by import.
    return callable(getattr(x, "update", None)) and type(x).__name__.endswith("Cache")


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Training calls drop the KV cache, as Hugging Face's gradient checkpointing does: the
    recompute would otherwise append the same keys and values to the cache a second time."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


class BlockProxy(nn.Module):
    """Stands where block ``index`` was; holds no parameters of its own."""

    def __init__(
        self, executor: Executor, index: int, attrs: dict[str, Any], activations: Activations | None = None
    ) -> None:
        super().__init__()
        self.executor = executor
        self.index = index
        self.activations = activations or Activations(DeviceStore())
        for name, value in attrs.items():  # e.g. attention_type, read by the model's loop
            setattr(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        template = self.executor.template
        if template.training != self.training:  # the template is outside the model's tree
            template.train(self.training)
        if not torch.is_grad_enabled():
            return self.executor.forward_block(self.index, args, kwargs)
        args, kwargs = _without_cache(args, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs), is_leaf=_is_leaf)
        box: dict[str, Any] = {}
        out = BlockFunction.apply(
            self.executor, self.activations, self.index, spec, box, self.executor.grad_token, *flat
        )
        return pytree.tree_unflatten(list(out), box["spec"])

    def extra_repr(self) -> str:
        return f"index={self.index}, streamed"
