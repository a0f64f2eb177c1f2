"""Loading a local Hugging Face directory: built on meta, weights streamed from safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.model.hf import CheckpointError, load_pretrained
from tests.models import batches, tiny


@pytest.mark.parametrize(("family", "shard"), [("llama", None), ("qwen2", None), ("llama", "40KB")])
def test_streamed_load_matches_transformers(tmp_path: Path, family: str, shard: str | None) -> None:
    ref = tiny(family)
    kwargs = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(str(tmp_path), **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model, materialize = load_pretrained(tmp_path)
    wrapped, _ = offload.wrap(model, device="cpu", dtype="float32", init=materialize)
    ids = batches(1)[0]
    ref.eval()
    wrapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-6, atol=1e-6
        )
    state = offload.state_dict(wrapped)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tiny("llama").save_pretrained(str(tmp_path))
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    model, materialize = load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'"):
        offload.wrap(model, device="cpu", init=materialize)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    tiny("llama").save_pretrained(str(tmp_path))
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(f), metadata={"format": "pt"})
    model, materialize = load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*shape \(7,\)"):
        offload.wrap(model, device="cpu", init=materialize)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_pretrained(tmp_path)
    tiny("llama").config.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_pretrained(tmp_path)
