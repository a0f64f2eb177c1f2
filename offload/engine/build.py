"""Turning an ordinary model into store records, one device template and block proxies.

The parameters of every block are copied into flat fp32 masters in the store and the block
modules are dropped, except block 0, which becomes the template: its parameters are removed and,
before each call, rebound to views of a device slot. Attributes that differ between blocks
(layer_idx, attention_type, ...) are recorded and set on the template per call.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload.model.discovery import BlockStack
from offload.model.layout import FlatLayout

SIMPLE = (int, float, str, bool, type(None))


@dataclass(slots=True)
class ParamGroupSpec:
    """Parameters whose full names match any of ``patterns`` (fnmatch) get ``options``."""

    patterns: tuple[str, ...]
    options: dict[str, Any]


def parse_param_groups(groups: Sequence[dict[str, Any]] | None) -> list[ParamGroupSpec]:
    specs = []
    for i, g in enumerate(groups or []):
        g = dict(g)
        pats = g.pop("params", None)
        if isinstance(pats, str):
            pats = [pats]
        if not pats or not all(isinstance(p, str) for p in pats):
            raise ValueError(f"param_groups[{i}].params must be name patterns (strings), got {pats!r}")
        unknown = set(g) - {"lr", "betas", "eps", "weight_decay"}
        if unknown:
            raise ValueError(f"param_groups[{i}] has unknown options {sorted(unknown)}")
        specs.append(ParamGroupSpec(tuple(pats), g))
    return specs


def group_of(name: str, specs: list[ParamGroupSpec]) -> int:
    """0 for the default group, else 1 + the index of the first spec matching name."""
    for i, spec in enumerate(specs):
        if any(fnmatch.fnmatchcase(name, p) for p in spec.patterns):
            return i + 1
    return 0


def named_unique(module: nn.Module, prefix: str = "") -> list[tuple[tuple[str, ...], nn.Parameter]]:
    """Parameters of module, each once, with every name it goes by (tied weights have several)."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in module.named_parameters(prefix=prefix, remove_duplicate=False):
        by_id.setdefault(id(p), ([], p))[0].append(name)
    return [(tuple(names), p) for names, p in by_id.values()]


def block_layout(block: nn.Module, prefix: str, specs: list[ParamGroupSpec]) -> FlatLayout:
    named = named_unique(block)
    return FlatLayout.build([(names, p, group_of(prefix + names[0], specs)) for names, p in named])


def attr_differences(blocks: list[nn.Module]) -> list[list[tuple[str, str, Any]]]:
    """Per block, (submodule name, attribute, value) for simple attributes that differ between
    blocks: the template must take each block's value before computing it."""

    def simple_attrs(block: nn.Module) -> dict[tuple[str, str], Any]:
        out = {}
        for mname, mod in block.named_modules():
            for attr, value in vars(mod).items():
                if not attr.startswith("_") and attr != "training" and isinstance(value, SIMPLE):
                    out[(mname, attr)] = value
        return out

    per_block = [simple_attrs(b) for b in blocks]
    keys = set().union(*per_block)
    varying = sorted(k for k in keys if len({repr(a.get(k)) for a in per_block}) > 1)
    return [[(m, a, attrs.get((m, a))) for m, a in varying] for attrs in per_block]


def check_buffers(blocks: list[nn.Module], path: str) -> None:
    """The template keeps block 0's buffers, so every block's buffers must equal them."""
    first = dict(blocks[0].named_buffers())
    for i, b in enumerate(blocks[1:], start=1):
        for name, buf in b.named_buffers():
            ref = first.get(name)
            if ref is None or ref.shape != buf.shape or not torch.equal(ref.cpu(), buf.cpu()):
                raise ValueError(
                    f"buffer {name!r} of block {i} in {path!r} differs from block 0's; offload streams "
                    "one template per stack and cannot hold per-block buffers"
                )


def make_template(
    block: nn.Module, layout: FlatLayout, device: torch.device
) -> list[list[tuple[nn.Module, str]]]:
    """Strips block's parameters (they will be rebound per call) and moves its buffers to device.
    Returns, per layout slot, the (module, attribute) pairs that slot's tensor fills."""
    bindings: list[list[tuple[nn.Module, str]]] = []
    for slot in layout.params:
        targets = []
        for name in slot.names:
            owner_name, _, attr = name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            owner._parameters.pop(attr, None)
            targets.append((owner, attr))
        bindings.append(targets)
    block.to(device)
    return bindings


def proxy_attrs(block: nn.Module) -> dict[str, Any]:
    """The block's own simple attributes (the model's loop may read them from the proxy)."""
    return {
        k: v
        for k, v in vars(block).items()
        if not k.startswith("_") and k != "training" and isinstance(v, SIMPLE)
    }


def resident_params(model: nn.Module, stack: BlockStack) -> list[tuple[tuple[str, ...], nn.Parameter]]:
    inside = {id(p) for b in stack.blocks for p in b.parameters()}
    prefix = stack.path + "."
    out = []
    for names, p in named_unique(model):
        if id(p) in inside:
            shared = [n for n in names if not n.startswith(prefix)]
            if shared:
                raise ValueError(
                    f"parameter {names[0]} is shared between a block and {shared}; not supported"
                )
            continue
        out.append((names, p))
    return out
