"""Request records for batched submission: ``engine.submit([Read(f, buf, off), Write(...)])``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offload.io.file import DirectFile


@dataclass(frozen=True, slots=True)
class Read:
    """Read ``nbytes`` (default: the whole buffer) at ``offset`` of ``file`` into ``buf``."""

    file: DirectFile
    buf: Any
    offset: int = 0
    nbytes: int | None = None


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``nbytes`` (default: the whole buffer) of ``buf`` at ``offset`` of ``file``."""

    file: DirectFile
    buf: Any
    offset: int = 0
    nbytes: int | None = None
