"""Flat layouts: every parameter of a block at a fixed offset in one contiguous buffer.

One buffer per kind of state (fp32 master, Adam m and v, the compute-dtype wire copy, gradients)
lets a block move with one copy and be updated with one optimizer call. Offsets are padded to
ALIGN elements so each view starts on a 256-byte boundary in fp32 (128 in bf16); padding stays
zero in every buffer, so it never changes a norm or an update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN = 64


@dataclass(frozen=True, slots=True)
class ParamSlot:
    """One parameter in a flat buffer; ``names`` has several entries for tied parameters."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    offset: int
    numel: int
    group: int  # optimizer param-group index
    source: int  # position in the list the layout was built from (pack() takes that order)


@dataclass(frozen=True, slots=True)
class FlatLayout:
    params: tuple[ParamSlot, ...]
    numel: int  # including padding
    # Contiguous [start, end) element ranges per param group, in group order.
    group_ranges: tuple[tuple[int, int, int], ...]

    @staticmethod
    def build(named: list[tuple[tuple[str, ...], torch.Tensor, int]]) -> FlatLayout:
        """named: (names, tensor, group) triples; parameters are laid out grouped by group."""
        ordered = sorted(enumerate(named), key=lambda t: t[1][2])
        slots, offset = [], 0
        ranges: list[tuple[int, int, int]] = []
        for source, (names, tensor, group) in ordered:
            if ranges and ranges[-1][0] == group:
                g, start, _ = ranges[-1]
                ranges[-1] = (g, start, offset)
            else:
                ranges.append((group, offset, offset))
            n = tensor.numel()
            slots.append(ParamSlot(tuple(names), tuple(tensor.shape), offset, n, group, source))
            offset += math.ceil(n / ALIGN) * ALIGN
            g, start, _ = ranges[-1]
            ranges[-1] = (g, start, offset)
        return FlatLayout(tuple(slots), offset, tuple(ranges))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of flat shaped like each parameter, in layout order."""
        return [flat[p.offset : p.offset + p.numel].view(p.shape) for p in self.params]

    def pack(self, tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Copies tensors (in the order the layout was built from) into flat, zeroing the padding."""
        flat.zero_()
        for view, p in zip(self.views(flat), self.params):
            view.copy_(tensors[p.source])
