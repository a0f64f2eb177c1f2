"""Export a checkpoint's weights as a Hugging Face model directory (``offload ckpt export``).

Writes ``OUT/model.safetensors`` (the ``master/`` tensors under the model's own names, converted
to the asked dtype) and ``OUT/config.json`` (the manifest's model config), which
``AutoModelForCausalLM.from_pretrained(OUT)`` loads. The file is streamed: its header is built
from the manifest (names, shapes, the target dtype), then each tensor is read from the checkpoint
(pieces.py: whole, or put together from the ranks' shards of a multi-rank checkpoint), converted
and written before the next is read, so the peak memory is about the largest tensor in float32
plus its converted copy, not the model. Tied parameters
are written once, under the name the config expects to find (the input embedding); the aliases
(``lm_head.weight``) are dropped when the config ties the embeddings, written as copies otherwise.
The directory is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offload._version import __version__
from offload.checkpoint.format import CheckpointCorrupt, CheckpointError, read_manifest, resolve, tensor_key
from offload.checkpoint.integrity import verify
from offload.checkpoint.pieces import Files
from offload.checkpoint.staging import SAFETENSORS_DTYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, name)


def export_hf(
    path_or_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Path:
    """Writes the checkpoint's weights to the new directory out as a Hugging Face model; returns
    out. Raises CheckpointError for a checkpoint saved without a model config or an out that
    exists, ValueError for an unknown dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: must be one of {sorted(DTYPES)}")
    path = resolve(path_or_root)
    problems = verify(path)
    if problems:
        raise CheckpointCorrupt(path, problems)
    manifest = read_manifest(path)
    config = manifest.get("model_config")
    if not config:
        raise CheckpointError(f"{path} was saved without a Hugging Face model config: cannot export")
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    names = _export_names(manifest["params"], tied=bool(config.get("tie_word_embeddings", False)))
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        _write_streamed(path, manifest["tensors"], names, DTYPES[dtype], tmp / "model.safetensors", progress)
        config = {**config, "torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_names(params: dict[str, Any], *, tied: bool) -> list[tuple[str, str]]:
    """(name in the export, name it was saved under) for every tensor to write."""
    pairs = []
    for name, info in params.items():
        pairs.append((name, name))
        if not tied:
            pairs.extend((alias, name) for alias in info.get("aliases", []))
    return pairs


def _write_streamed(
    ckpt: Path,
    tensors: dict[str, Any],
    names: list[tuple[str, str]],
    dtype: torch.dtype,
    file: Path,
    progress: Progress | None,
) -> None:
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": f"offload {__version__}"}}
    begin = 0
    for name, saved in names:
        shape = tensors[tensor_key("master", saved)]["shape"]
        nbytes = size * _numel(shape)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": shape,
            "data_offsets": [begin, begin + nbytes],
        }
        begin += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors spec asks
    with Files(ckpt) as files, open(file, "xb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, (name, saved) in enumerate(names):
            key = tensor_key("master", saved)
            t = torch.from_numpy(files.read(key, tensors[key])).to(dtype)  # one tensor at a time
            f.write(t.view(torch.uint8).numpy().data)
            del t
            if progress is not None:
                progress(i + 1, len(names), name)
        f.flush()
        os.fsync(f.fileno())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
