"""The CPU-master store: per-block flat fp32 master, Adam state, wire copy and gradients."""

from offload.store.record import BlockRecord

__all__ = ["BlockRecord"]
