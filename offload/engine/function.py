"""The autograd Function of one streamed block, and the proxy module that stands in its place.

The model's own forward loop keeps calling ``self.layers[i](hidden, **kwargs)``; each proxy
routes the call to the executor. With autograd on, the call is a BlockFunction: forward without
autograd (saving only the block's inputs), backward by recomputation. Arguments and outputs may
be any nesting of tuples, lists and dicts; tensors among them that require grad get gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from offload.engine.executor import Executor


def _is_leaf(x: Any) -> bool:
    # Only containers are traversed: objects such as a KV cache pass through whole.
    return not isinstance(x, (list, tuple, dict))


class BlockFunction(torch.autograd.Function):
    """One block: ``apply(executor, index, spec, box, token, *flat_inputs)``.

    ``token`` is a zero-size tensor that requires grad, so the block is in the autograd graph
    (and its weights get gradients) even when none of its inputs requires grad.
    """

    @staticmethod
    def forward(
        ctx: Any, executor: Executor, index: int, spec: Any, box: dict, token: Any, *flat: Any
    ) -> Any:
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        ctx.executor, ctx.index, ctx.spec = executor, index, spec
        ctx.rng = executor.device.rng_state()  # the recompute must draw the same random numbers
        ctx.tensor_pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in flat]
        ctx.save_for_backward(*[flat[i] for i in ctx.tensor_pos])
        out = executor.forward_block(index, args, kwargs)
        out_flat, box["spec"] = pytree.tree_flatten(out, is_leaf=_is_leaf)
        return tuple(out_flat)

    @staticmethod
    def backward(ctx: Any, *grad_outs: Any) -> Any:
        flat = list(ctx.others)
        needs = ctx.needs_input_grad[5:]
        inputs: list[torch.Tensor] = []
        want: list[int] = []
        for pos, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            t = t.detach()
            if needs[pos]:
                t.requires_grad_(True)
                inputs.append(t)
                want.append(pos)
            flat[pos] = t
        args, kwargs = pytree.tree_unflatten(flat, ctx.spec)
        executor: Executor = ctx.executor

        def run() -> list[Any]:
            with executor.device.fork_rng():
                executor.device.set_rng_state(ctx.rng)
                out = executor.template(*args, **kwargs)
            return pytree.tree_leaves(out, is_leaf=_is_leaf)

        input_grads = executor.backward_block(ctx.index, run, inputs, list(grad_outs))
        result: list[Any] = [None] * len(flat)
        for pos, g in zip(want, input_grads):
            result[pos] = g
        return (None, None, None, None, None, *result)


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

    def __init__(self, executor: Executor, index: int, attrs: dict[str, Any]) -> None:
        super().__init__()
        self.executor = executor
        self.index = index
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
        out = BlockFunction.apply(self.executor, self.index, spec, box, self.executor.grad_token, *flat)
        return pytree.tree_unflatten(list(out), box["spec"])

    def extra_repr(self) -> str:
        return f"index={self.index}, streamed"
