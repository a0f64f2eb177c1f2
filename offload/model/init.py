"""Materialising a model built on the meta device one piece at a time.

A model too large to exist twice in host memory is built on the meta device; each block (and
each resident module) is then given real memory, initialised, packed into the store and dropped
before the next, so at most one block exists outside the store at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# Gives a module's own parameters and buffers real values; called with the module and its name
# in the model (e.g. "model.layers.3.mlp"), so a loader can look its tensors up.
Materialize = Callable[[nn.Module, str], None]


def has_meta(module: nn.Module, recurse: bool = True) -> bool:
    tensors = list(module.parameters(recurse)) + list(module.buffers(recurse))
    return any(t.is_meta for t in tensors)


def materializer(model: nn.Module, init: str | Materialize | None) -> Materialize | None:
    """The materialize function for init: "random" uses the model's own ``_init_weights`` (the
    Hugging Face initialisation), a callable is used as is, None means the model must not be
    on the meta device."""
    if init is None or callable(init):
        return init
    if init != "random":
        raise ValueError(f"init must be None, 'random' or a callable, got {init!r}")
    init_weights: Any = getattr(model, "_init_weights", None)
    if init_weights is None:
        raise ValueError(
            f"init='random' uses the model's _init_weights (Hugging Face models have one); {type(model).__name__} "
            "has none: pass init=callable(module) that fills a module's own tensors"
        )

    def run(module: nn.Module, name: str) -> None:
        module.to_empty(device="cpu", recurse=False)
        init_weights(module)

    return run


def materialize_tree(
    module: nn.Module, fn: Materialize, prefix: str = "", skip: frozenset[int] = frozenset()
) -> None:
    """Applies fn to every submodule of module (parents first) that holds meta tensors of its
    own, except those whose id is in skip (and their subtrees). prefix is module's own name."""

    def visit(m: nn.Module, name: str) -> None:
        if id(m) in skip:
            return
        if has_meta(m, recurse=False):
            fn(m, name)
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(module, prefix)


def materialize_outside(model: nn.Module, fn: Materialize, blocks: list[nn.Module]) -> None:
    """Materialises everything but the blocks. Giving a tied parameter new memory unties it, so
    models that know their ties (Hugging Face's tie_weights) re-tie them afterwards."""
    materialize_tree(model, fn, skip=frozenset(id(b) for b in blocks))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
