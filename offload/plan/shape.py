"""ModelShape: the element counts the store will allocate for a model, read off the meta device.

The counts come from the same rules the runtime uses (``discover`` for the block stack,
``FlatLayout.build`` for the 64-element padding, ``resident_params``/``named_unique`` for the
resident parameters and tied weights), so a plan's bytes are the bytes ``offload.wrap`` allocates.
Nothing is allocated: every tensor may be on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from offload.engine.build import block_layout, named_unique, resident_params
from offload.model.discovery import discover
from offload.model.layout import FlatLayout


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Element counts of one model as the store lays it out."""

    blocks: int
    """Blocks in the stack."""
    block_numel: int
    """Elements of one block's flat buffer, padding included."""
    resident_numel: int
    """Elements of the residents' flat buffer, padding included; 0 when there are none."""
    resident_trainable: int
    """Elements of the resident parameters that take gradients (their device ``.grad``)."""
    params: int
    """Unique parameters of the model, without padding (tied weights once)."""
    hidden_size: int | None
    """Width of the block-boundary hidden state; None when the model does not say."""
    vocab_size: int | None = None
    """Rows of the output head (the logits' width); None when the model does not say."""
    intermediate_size: int | None = None
    """Width of the blocks' MLP; None when the model does not say (4 x hidden is assumed)."""

    def to_json(self) -> dict[str, int | None]:
        return {
            "blocks": self.blocks,
            "block_numel": self.block_numel,
            "resident_numel": self.resident_numel,
            "params": self.params,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size,
        }


def model_shape(model: nn.Module, blocks: str | None = None) -> ModelShape:
    """The shape of model (on any device, meta included); blocks names the stack as in wrap()."""
    stack = discover(model, blocks)
    layout = block_layout(stack.blocks[0], stack.path + ".0.", [])  # groups move params, not padding
    resident = resident_params(model, stack)
    res_numel = FlatLayout.build([(names, p, 0) for names, p in resident]).numel if resident else 0
    return ModelShape(
        blocks=len(stack.blocks),
        block_numel=layout.numel,
        resident_numel=res_numel,
        resident_trainable=sum(p.numel() for _, p in resident if p.requires_grad),
        params=sum(p.numel() for _, p in named_unique(model)),
        hidden_size=_config_int(model, ("hidden_size", "n_embd", "d_model")),
        vocab_size=_config_int(model, ("vocab_size",)),
        intermediate_size=_config_int(model, ("intermediate_size", "n_inner", "ffn_dim")),
    )


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of names the model's config holds as an int."""
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
