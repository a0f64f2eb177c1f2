"""load(): puts a committed checkpoint back into a wrapped model and its optimizer.

The checkpoint is verified first (every crc32; CheckpointCorrupt names the file and tensor), then
read by parameter name with safetensors (never pickle): masters into each record (its wire copy
refreshed, on the device for a record kept there), Adam m and v through the record's StateTier
(into its NVMe file when that is where they live), step counts, param-group options, the
scheduler's state and the RNG states (each rank its own when the checkpoint was saved by as
many ranks, else rank 0's). Loading bumps every record's version, so no slot or resident buffer
on the device keeps weights from before the load.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from offload.checkpoint import state
from offload.checkpoint.format import (
    KINDS,
    CheckpointCorrupt,
    CheckpointError,
    read_manifest,
    resolve,
    tensor_key,
)
from offload.checkpoint.integrity import verify
from offload.checkpoint.writer import drain


def load(
    model: Any, optimizer: Any, path_or_root: str | os.PathLike[str], *, scheduler: Any = None
) -> dict[str, Any]:
    """Restores the checkpoint at path_or_root (a step directory, or a root: its ``latest``) and
    returns the ``extra`` dict it was saved with. Call it between steps (after zero_grad())."""
    rt = state.runtime_of(model, optimizer)
    drain(rt)  # a save in flight still reads the records this overwrites
    path = resolve(path_or_root)
    problems = verify(path)
    if problems:
        raise CheckpointCorrupt(path, problems)
    manifest = read_manifest(path)
    records = state.params_of(rt)
    saved_name = _match_names(manifest["params"], records, path)
    if (manifest.get("scheduler") is None) != (scheduler is None):
        have = "has" if manifest.get("scheduler") is not None else "has no"
        raise CheckpointError(f"{path} {have} scheduler state; pass scheduler= accordingly")
    rt.wait_updates()  # host wait: no queued update may write a record while it is loaded
    tensors = manifest["tensors"]
    with contextlib.ExitStack() as files:
        opened: dict[str, Any] = {}

        def get(key: str) -> Any:
            file = tensors[key]["file"]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(str(path / file), framework="pt"))
            return opened[file].get_tensor(key)

        for rec, refs in records:
            steps = {manifest["params"][saved_name[ref.names[0]]]["step"] for ref in refs}
            if len(steps) > 1:
                raise CheckpointError(
                    f"{path}: the parameters of {rec.name} were saved at different steps {steps}"
                )
            with state.optimizer_state(rt, rec) as (master, m, v):
                for kind, flat in zip(KINDS, (master, m, v)):
                    # Multi-rank, a record holds a shard: the whole block is put together, one
                    # kind at a time, and this rank keeps its part (any world size loads).
                    whole = flat if rec.shard is None else torch.zeros(state.padded_numel(rt, rec))
                    for ref in refs:
                        ref.view(whole).copy_(get(tensor_key(kind, saved_name[ref.names[0]])))
                    if rec.shard is not None:
                        flat.copy_(whole[rec.shard[0] : rec.shard[1]])
                if rec.wire.data_ptr() != master.data_ptr():
                    rec.wire.copy_(master)
            rec.step.fill_(float(steps.pop()))
            rec.version += 1  # device slots and the resident buffer must copy the new weights
    rt.wait_updates()  # the tier's write-backs of the loaded m and v are stored
    state.load_param_groups(optimizer, manifest["optimizer"]["param_groups"])
    if scheduler is not None:
        scheduler.load_state_dict(manifest["scheduler"])
    state.set_rng_state(state.rng_state_for(manifest, rt.group))
    return dict(manifest.get("extra") or {})


def _match_names(
    saved: dict[str, Any], records: list[tuple[Any, list[state.ParamRef]]], path: Path
) -> dict[str, str]:
    """Model parameter (canonical name) -> the name it was saved under; raises CheckpointError
    listing parameters missing on either side or with another shape."""
    by_alias = {alias: name for name, info in saved.items() for alias in (name, *info.get("aliases", []))}
    out: dict[str, str] = {}
    missing, shapes = [], []
    for _, refs in records:
        for ref in refs:
            name = next((by_alias[n] for n in ref.names if n in by_alias), None)
            if name is None:
                missing.append(ref.names[0])
            elif list(saved[name]["shape"]) != list(ref.slot.shape):
                shapes.append(f"{ref.names[0]}: saved {saved[name]['shape']}, model {list(ref.slot.shape)}")
            else:
                out[ref.names[0]] = name
    unexpected = sorted(set(saved) - set(out.values()))
    if missing or shapes or unexpected:
        parts = [
            f"missing from the checkpoint: {missing[:5]}" if missing else "",
            f"not in the model: {unexpected[:5]}" if unexpected else "",
            f"shape differs: {shapes[:5]}" if shapes else "",
        ]
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(p for p in parts if p)})")
    return out
