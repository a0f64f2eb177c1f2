"""Splitting a model into resident parameters and a stack of identical blocks (offload.model)."""

from offload.model.discovery import BlockStack, UnsupportedModelError, discover
from offload.model.layout import FlatLayout, ParamSlot

__all__ = ["BlockStack", "FlatLayout", "ParamSlot", "UnsupportedModelError", "discover"]
