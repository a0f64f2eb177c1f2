"""Hugging Face models for offload: built on the meta device, weights streamed into the store.

``load_pretrained(path)`` reads config.json from a local directory, builds the model on the meta
device and returns a materialize function that fills each module from the directory's
safetensors shards as the store packs it: a 7B model never exists twice in host memory, and the
file is read tensor by tensor (safetensors maps the file; nothing is unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offload.model.init import Materialize


class CheckpointError(ValueError):
    """A model directory that cannot be loaded: missing files or tensors, or wrong shapes."""


def build_on_meta(config: Any) -> nn.Module:
    """The causal LM of a transformers config, with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _index(path: Path) -> dict[str, Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_pretrained(path: str | Path) -> tuple[nn.Module, Materialize]:
    """A meta-device model for the Hugging Face directory path and the materialize function that
    loads its weights (pass both to ``offload.wrap(model, init=materialize)``)."""
    from transformers import AutoConfig

    root = Path(path)
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    config.use_cache = False
    model = build_on_meta(config)
    files = _index(root)
    init_weights: Any = model._init_weights
    handles: dict[Path, Any] = {}

    def tensor(name: str) -> torch.Tensor | None:
        file = files.get(name)
        if file is None:
            return None
        if file not in handles:
            from safetensors import safe_open

            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(name)

    def materialize(module: nn.Module, name: str) -> None:
        module.to_empty(device="cpu", recurse=False)
        init_weights(module)  # buffers the checkpoint does not hold (rotary frequencies, ...)
        for pname, param in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            value = tensor(key)
            if value is None:
                if _tied(model, key):
                    continue  # re-tied after materialization
                raise CheckpointError(f"{root}: the checkpoint has no tensor {key!r}")
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{root}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)

    return model, materialize


def _tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        tied = list(tied)
    return key in tied or bool(
        getattr(model.config, "tie_word_embeddings", False) and key.endswith("lm_head.weight")
    )
