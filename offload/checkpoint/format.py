"""The on-disk checkpoint format: names, the manifest, safetensors headers, committed steps.

A checkpoint root holds one directory per saved step and a ``latest`` file::

    ROOT/
      latest                      "step_000123\\n": the newest committed step
      step_000123/
        resident.safetensors      per-parameter tensors of one store record, full model names
        block.0.safetensors
        block.1.rank00001.safetensors   multi-rank: rank 1's shard of block 1 (version 2)
        ...
        manifest.json             written last: the index of everything above

Tensors are keyed ``master/<name>``, ``exp_avg/<name>`` and ``exp_avg_sq/<name>`` with the
model's own parameter names, unflattened, so a checkpoint does not depend on the store's flat
layout or on where each record lived (host, device, NVMe). Format version 2 (a multi-rank save)
adds sharded tensors: each rank writes its shard of every streamed block into a file of its own,
and a tensor's manifest entry lists its pieces (``shards``: which rank, which range of the
flattened tensor's elements, where); pieces.py reads them back. A directory counts as a checkpoint only
when its name is ``step_<digits>`` and it holds ``manifest.json``: writers build it under
``step_<digits>.tmp-<uuid>.<pid>@<host>`` and rename it into place (see writer.py); a prune renames
a step to ``step_<digits>.tmp-del-<uuid>.<pid>@<host>`` before deleting it. The owner in those
names lets a later save or prune tell the ones a killed process left behind (``abandoned``) and
take their space back. Nothing here imports torch, so ``offload ckpt ls/inspect/verify`` stay
light, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # sharded tensors (pieces.py): what a multi-rank save writes
WHOLE_FORMAT_VERSION = 1  # whole tensors only: what a one-process save writes (older offload reads it)
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LATEST = "latest"
KINDS = ("master", "exp_avg", "exp_avg_sq")  # per parameter, in this order in each file
STEP_RE = re.compile(r"^step_(\d+)$")
TEMP_RE = re.compile(r"^(step_\d+)\.tmp(?:-del)?-[0-9a-f]{32}\.(\d+)@(.+)$")  # base, pid, host
# safetensors dtype names -> bytes per element
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the path (and tensor) at fault."""


class CheckpointNotFound(CheckpointError):
    """No committed checkpoint where one was asked for."""


class CheckpointCorrupt(CheckpointError):
    """verify() found problems; ``problems`` lists them, the message names the first."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"checkpoint {path} is corrupt: {problems[0]}{more}")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint: the file, the tensor (if one) and what."""

    file: str
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: tensor {self.tensor!r}" if self.tensor else self.file
        return f"{where}: {self.message}"


def step_dirname(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step = {step!r}: must be a non-negative int")
    return f"step_{step:06d}"


def tensor_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def record_filename(record_name: str) -> str:
    return f"{record_name}.safetensors"


def shard_filename(record_name: str, rank: int) -> str:
    """The file rank writes its shard of a sharded record into (multi-rank saves)."""
    return f"{record_name}.rank{rank:05d}.safetensors"


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor entries and ``__metadata__``) and the offset where its
    data starts. Raises ValueError on a file too short or with a malformed header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ValueError(f"safetensors header length {n} is implausible")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError(f"safetensors header cut short ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header, 8 + n


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint directory path (json only)."""
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{path} has no {MANIFEST}: not a committed checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READ_VERSIONS:
        raise CheckpointError(
            f"{path / MANIFEST}: format_version {version!r}, this offload reads {', '.join(map(str, READ_VERSIONS))}"
        )
    return manifest


def is_committed(path: Path) -> bool:
    return STEP_RE.match(path.name) is not None and (path / MANIFEST).is_file()


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Committed checkpoints under root as (step, path), oldest first. Directories still being
    written (``.tmp-`` names) or without a manifest are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_committed(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_marker(root: Path) -> str | None:
    """The directory name ``latest`` names, or None."""
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def resolve(path_or_root: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a root: then the one ``latest`` names if it is committed, else
    the newest committed one. Raises CheckpointNotFound when there is none."""
    p = Path(path_or_root)
    if (p / MANIFEST).is_file():
        return p
    if not p.is_dir():
        raise CheckpointNotFound(f"{p} does not exist")
    name = latest_marker(p)
    if name is not None and STEP_RE.match(name) and is_committed(p / name):
        return p / name
    found = list_checkpoints(p)
    if not found:
        raise CheckpointNotFound(f"{p} holds no committed checkpoint (no step_* directory with a {MANIFEST})")
    return found[-1][1]


def temp_dirname(step_dir: str, deleting: bool = False) -> str:
    """A temporary name for the step directory step_dir while it is written (or, deleting, while it
    is removed): no listing counts it, and it names its owner, this process on this host."""
    kind = "tmp-del" if deleting else "tmp"
    return f"{step_dir}.{kind}-{uuid.uuid4().hex}.{os.getpid()}@{socket.gethostname()}"


def abandoned(root: str | os.PathLike[str]) -> list[Path]:
    """The temporary step directories under root whose owner was a process of this host that is
    gone (a save or a prune killed halfway), by name. Names without an owner are never counted,
    nor those of another host or of a process still running (a pid reused since is taken for
    running: such a directory is only left alone)."""
    root = Path(root)
    if not root.is_dir():
        return []
    host = socket.gethostname()
    out = []
    for p in root.iterdir():
        m = TEMP_RE.match(p.name)
        if m and m.group(3) == host and not _running(int(m.group(2))) and p.is_dir():
            out.append(p)
    return sorted(out)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_dir(path: Path) -> None:
    """fsync of a directory: the renames and removals in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
