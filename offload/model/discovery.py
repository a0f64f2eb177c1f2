"""Block discovery: find the stack of repeated blocks that offload streams through the GPU.

A model is treated as resident parameters (embeddings, final norm, head: small, kept on the
device) plus N identical blocks (transformer layers) held in one torch.nn.ModuleList. Known
Hugging Face families are found by their attribute path; anything else by searching for the
ModuleList of identical blocks (same class, same parameter names and shapes) holding the most
parameters. A model without one gets an error saying what was looked for and how to name it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Attribute paths of the block stack in the Hugging Face families offload knows by name.
KNOWN_STACKS = {
    "LlamaForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "GPT2LMHeadModel": "transformer.h",
    "LlamaModel": "layers",
    "MistralModel": "layers",
    "Qwen2Model": "layers",
    "GPT2Model": "h",
}


class UnsupportedModelError(ValueError):
    """The model has no stack of identical blocks that offload can stream."""


@dataclass(slots=True)
class BlockStack:
    """Where the blocks live: ``getattr(owner, attr)`` is the ModuleList ``blocks``."""

    path: str
    owner: nn.Module
    attr: str
    blocks: list[nn.Module]


def discover(model: nn.Module, path: str | None = None) -> BlockStack:
    """Finds the block stack of model; ``path`` (e.g. ``"model.layers"``) names it explicitly."""
    if path is None:
        path = KNOWN_STACKS.get(type(model).__name__) or _search(model)
    owner_path, _, attr = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
        stack = getattr(owner, attr)
    except AttributeError as e:
        raise UnsupportedModelError(f"{type(model).__name__} has no submodule {path!r}: {e}") from None
    if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
        raise UnsupportedModelError(
            f"{path!r} in {type(model).__name__} is not a non-empty torch.nn.ModuleList"
        )
    blocks = list(stack)
    problem = _not_identical(blocks)
    if problem:
        raise UnsupportedModelError(f"the blocks of {path!r} are not identical: {problem}")
    return BlockStack(path, owner, attr, blocks)


def _signature(block: nn.Module) -> tuple:
    return (type(block), tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()))


def _not_identical(blocks: list[nn.Module]) -> str | None:
    first = _signature(blocks[0])
    if not first[1]:
        return "block 0 has no parameters"
    for i, b in enumerate(blocks[1:], start=1):
        if _signature(b) != first:
            return f"block {i} differs from block 0 in class or parameter names, shapes or dtypes"
    return None


def _search(model: nn.Module) -> str:
    best: tuple[int, str] | None = None
    seen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        seen.append(f"{name} ({len(mod)} x {type(mod[0]).__name__})")
        if _not_identical(list(mod)) is None:
            numel = sum(p.numel() for p in mod.parameters())
            if best is None or numel > best[0]:
                best = (numel, name)
    if best is None:
        found = ", ".join(seen) or "none"
        raise UnsupportedModelError(
            f"offload looked in {type(model).__name__} for a torch.nn.ModuleList of at least two identical "
            f"blocks (same class, same parameter names and shapes) and found none (ModuleLists seen: {found}). "
            "Name the stack explicitly with offload.wrap(model, blocks='path.to.modulelist'), or restructure "
            "the model so its repeated layers live in one ModuleList."
        )
    return best[1]
