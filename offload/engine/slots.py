"""Device weight slots: K flat buffers that blocks take turns in (K=2 is double buffering).

Streamed blocks take the slots in turn. A slot remembers which block and version it holds, so a
block still in its slot (the last blocks of forward, first of backward) is not copied again.
"""

from __future__ import annotations

from typing import Any

import torch

from offload.engine.device import Device
from offload.model.layout import FlatLayout


class WeightSlots:
    def __init__(
        self, device: Device, layout: FlatLayout, dtype: torch.dtype, k: int, numel: int | None = None
    ) -> None:
        """numel: elements per buffer when more than the layout's (multi-rank: the padding that
        makes the ranks' shards equal)."""
        self.device = device
        self.k = k
        size = layout.numel if numel is None else numel
        self.buffers = [torch.zeros(size, dtype=dtype, device=device.torch) for _ in range(k)]
        self.views = [layout.views(b) for b in self.buffers]
        self.holds: list[tuple[int, int] | None] = [None] * k  # (block index, version)
        self.ready: list[Any] = [None] * k  # event: the upload into the slot has landed
        self.free: list[Any] = [None] * k  # event: the last compute reading the slot is done

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)
