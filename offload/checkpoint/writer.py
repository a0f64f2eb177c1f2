"""save(): writes one checkpoint step and commits it atomically.

The step is built in ``ROOT/step_N.tmp-<uuid>/``: one safetensors file per store record, each
fsynced, then ``manifest.json`` (fsynced), then the directory is fsynced and renamed to
``ROOT/step_N/`` and the root fsynced: the rename is the commit, so a reader sees either no
step N or all of it. ``latest`` is then replaced the same way (temporary name, fsync, rename).
A save that fails removes its temporary directory.

Today save() writes before it returns and hands back a finished SaveHandle; the handle is the
API a later asynchronous writer keeps (snapshot now, write in the background, ``wait()``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from offload._version import __version__
from offload.checkpoint import state
from offload.checkpoint.format import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    record_filename,
    step_dirname,
    tensor_key,
)
from offload.checkpoint.retention import Retention, prune
from offload.config import config_to_dict

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SaveHandle:
    """A save in progress or done. ``wait()`` returns the committed directory or raises the
    save's error; ``path`` is where the step is (or will be) committed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self) -> bool:
        return True  # synchronous for now: save() returns after the commit

    def wait(self) -> Path:
        return self.path

    def __repr__(self) -> str:
        return f"SaveHandle({str(self.path)!r}, done={self.done()})"


def save(
    model: Any,
    optimizer: Any,
    root: str | os.PathLike[str],
    *,
    step: int,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    keep_every: int | None = None,
) -> SaveHandle:
    """Saves masters, Adam state, step counts, param-group options, the scheduler's state, RNG
    states and extra (plain JSON data, e.g. the data stream's state_dict) as ``root/step_<step>``.
    With keep_last, older committed steps are pruned after the commit (retention.py): the newest
    keep_last and every step divisible by keep_every stay, and never the one just written."""
    retention = None
    if keep_last is not None:
        retention = Retention(keep_last=keep_last, keep_every=keep_every)
    elif keep_every is not None:
        raise ValueError(f"keep_every = {keep_every!r} needs keep_last")
    rt = state.runtime_of(model, optimizer)
    sched = _plain("scheduler.state_dict()", scheduler.state_dict()) if scheduler is not None else None
    extra = _plain("extra", extra if extra is not None else {})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    rt.wait_updates()  # host wait: every queued update has stored its master, m and v
    tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        params, tensors = _write_records(rt, tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "offload_version": __version__,
            "step": step,
            "created_unix": time.time(),
            "model_class": type(getattr(model, "module", model)).__name__,
            "config": config_to_dict(rt.cfg),
            "model_config": state.model_config(model),
            "optimizer": {"param_groups": state.param_groups_state(optimizer)},
            "scheduler": sched,
            "rng": state.rng_state(),
            "extra": extra,
            "params": params,
            "tensors": tensors,
        }
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)  # the commit
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_file(root / LATEST, f"{final.name}\n".encode(), atomic=True)
    _fsync_dir(root)
    if retention is not None:
        prune(root, retention, protect=[final])  # after latest moved: the old one may go too
        _fsync_dir(root)
    return SaveHandle(final)


def _plain(what: str, value: Any) -> Any:
    """value as it will read back from JSON; a ValueError naming what when it is not plain data."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON data (dicts, lists, str, numbers): {e}") from None


def _write_records(rt: Any, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    params: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for rec, refs in state.params_of(rt):
        file = record_filename(rec.name)
        step = int(rec.step.item())
        with state.optimizer_state(rt, rec) as (m, v):
            items = []
            for ref in refs:
                name = ref.names[0]
                params[name] = {"aliases": list(ref.names[1:]), "shape": list(ref.slot.shape), "step": step}
                for kind, flat in (("master", rec.master), ("exp_avg", m), ("exp_avg_sq", v)):
                    items.append((tensor_key(kind, name), ref.view(flat)))
            for key, entry in write_safetensors(tmp / file, items).items():
                tensors[key] = {"file": file, **entry}
    return params, tensors


def write_safetensors(path: Path, items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """Writes a safetensors file straight from the tensors (no packed copy of the whole file),
    fsyncs it, and returns per key {dtype, shape, offset, nbytes, crc32} (offset: from the start
    of the file)."""
    items = list(items)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": f"offload {__version__}"}}
    begin = 0
    for key, t in items:
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [begin, begin + nbytes],
        }
        begin += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors spec asks
    start = 8 + len(raw)
    index = {}
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, t in items:
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            h = header[key]
            b, e = h["data_offsets"]
            index[key] = {
                "dtype": h["dtype"],
                "shape": h["shape"],
                "offset": start + b,
                "nbytes": e - b,
                "crc32": zlib.crc32(data.data),
            }
        f.flush()
        os.fsync(f.fileno())
    return index


def _write_file(path: Path, data: bytes, atomic: bool = False) -> None:
    """Writes and fsyncs path; atomic: through a temporary name renamed over it."""
    target = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}") if atomic else path
    try:
        with open(target, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic:
            target.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
