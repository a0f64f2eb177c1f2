"""load(): puts a committed checkpoint back into a wrapped model and its optimizer.

The checkpoint is verified first (CheckpointCorrupt names the file and tensor), then read by
parameter name (pieces.py: positioned reads of safetensors files, never pickle): masters into each
record (its wire copy
refreshed, on the device for a record kept there), Adam m and v through the record's StateTier
(into its NVMe file when that is where they live), step counts, param-group options, the
scheduler's state and the RNG states (each rank its own when the checkpoint was saved by as
many ranks, else rank 0's). Loading bumps every record's version, so no slot or resident buffer
on the device keeps weights from before the load.

At any world size, a record held as a shard takes only the elements of its shard from each
parameter, read from the pieces that hold them: from the whole tensors of a one-process
checkpoint, or from the ranks' files of a multi-rank one (at the world size that saved, exactly
this rank's own file). Only those pieces' crc32s are summed on this rank (every file's header and
size are checked on every rank), and the ranks agree on the problems before any record changes:
a corrupt piece makes every rank refuse the checkpoint, not only the rank that reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from offload.checkpoint import ranks, state
from offload.checkpoint.format import (
    KINDS,
    MANIFEST,
    CheckpointCorrupt,
    CheckpointError,
    Problem,
    read_manifest,
    resolve,
    tensor_key,
)
from offload.checkpoint.integrity import verify
from offload.checkpoint.pieces import Files, pieces
from offload.checkpoint.writer import drain
from offload.engine.runtime import Runtime
from offload.store.record import BlockRecord


def load(
    model: Any, optimizer: Any, path_or_root: str | os.PathLike[str], *, scheduler: Any = None
) -> dict[str, Any]:
    """Restores the checkpoint at path_or_root (a step directory, or a root: its ``latest``) and
    returns the ``extra`` dict it was saved with. Call it between steps (after zero_grad())."""
    rt = state.runtime_of(model, optimizer)
    drain(rt)  # a save in flight still reads the records this overwrites
    path = resolve(path_or_root)
    records = state.params_of(rt)
    manifest, saved_name = _checked(rt, path, records)
    if (manifest.get("scheduler") is None) != (scheduler is None):
        have = "has" if manifest.get("scheduler") is not None else "has no"
        raise CheckpointError(f"{path} {have} scheduler state; pass scheduler= accordingly")
    rt.wait_updates()  # host wait: no queued update may write a record while it is loaded
    tensors = manifest["tensors"]
    with Files(path) as files:
        for rec, refs in records:
            steps = {manifest["params"][saved_name[ref.names[0]]]["step"] for ref in refs}
            if len(steps) > 1:
                raise CheckpointError(
                    f"{path}: the parameters of {rec.name} were saved at different steps {steps}"
                )
            with state.optimizer_state(rt, rec) as (master, m, v):
                for kind, flat in zip(KINDS, (master, m, v)):
                    flat.zero_()  # the layout's gaps and the shard's padding, as a fresh wrap has them
                    for ref, lo, hi, at in _wanted(rec, refs):
                        key = tensor_key(kind, saved_name[ref.names[0]])
                        flat[at : at + hi - lo].copy_(torch.from_numpy(files.read(key, tensors[key], lo, hi)))
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


def _checked(
    rt: Runtime, path: Path, records: list[tuple[BlockRecord, list[state.ParamRef]]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest and the saved name of each model parameter, once the pieces this rank reads
    are verified; multi-rank, every rank raises CheckpointCorrupt if any rank found a problem."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        problems = [Problem(MANIFEST, None, str(e))]
    else:
        saved_name = _match_names(manifest["params"], records, path)
        problems = verify(path, only=_pieces_read(manifest["tensors"], records, saved_name))
    problems = ranks.all_problems(rt.group, problems)
    if problems:
        raise CheckpointCorrupt(path, problems)
    return manifest, saved_name


def _wanted(rec: BlockRecord, refs: list[state.ParamRef]) -> list[tuple[state.ParamRef, int, int, int]]:
    """(parameter, lo, hi, at): elements [lo, hi) of each parameter that rec holds, at element at of
    its flat buffers (rec's shard of them, when sharded)."""
    base, end = rec.shard if rec.shard is not None else (0, rec.layout.numel)
    out = []
    for ref in refs:
        a, b = max(base, ref.slot.offset), min(end, ref.slot.offset + ref.slot.numel)
        if a < b:
            out.append((ref, a - ref.slot.offset, b - ref.slot.offset, a - base))
    return out


def _pieces_read(
    tensors: dict[str, Any],
    records: list[tuple[BlockRecord, list[state.ParamRef]]],
    saved_name: dict[str, str],
) -> set[tuple[str, str]]:
    """(file, key) of every piece this rank reads: those that overlap what its records hold."""
    out: set[tuple[str, str]] = set()
    for rec, refs in records:
        for ref, lo, hi, _ in _wanted(rec, refs):
            for kind in KINDS:
                key = tensor_key(kind, saved_name[ref.names[0]])
                if key in tensors:  # a key missing from the index is verify's problem to report
                    out.update((p.file, key) for p in pieces(key, tensors[key]) if p.lo < hi and lo < p.hi)
    return out


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
