"""Retention: which committed steps to keep, and pruning the rest.

``Retention(keep_last=3, keep_every=1000)`` keeps the three newest steps and every step divisible
by 1000; ``prune(root, retention)`` deletes the others, never the step ``latest`` names nor a
protected one (``save`` protects the step it just committed). A step is taken out of the listing
first, by renaming it to ``step_N.tmp-del-<uuid>.<pid>@<host>`` (atomic: a reader sees the whole
step or none), then deleted; a prune killed halfway leaves only such a directory, never a half
step. A prune also deletes the temporary directories that killed saves and prunes of this host
left behind (``format.abandoned``), so that their space does not stay lost.
``doomed(..., upcoming=name)`` answers the same question as if the step ``name`` were already
committed and named by ``latest``: what a save with ``prune="before"`` takes out when it starts
(recycle.py). Torch-free, so ``offload ckpt prune`` stays light.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from offload.checkpoint.format import STEP_RE, abandoned, latest_marker, list_checkpoints, temp_dirname


@dataclass(kw_only=True, slots=True, frozen=True)
class Retention:
    """Which committed steps survive a prune."""

    keep_last: int
    """The newest this many steps are kept (at least 1)."""
    keep_every: int | None = None
    """Also keep every step divisible by this (milestones); None: none beyond keep_last."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, int) or isinstance(self.keep_last, bool) or self.keep_last < 1:
            raise ValueError(f"keep_last = {self.keep_last!r}: must be an int >= 1")
        every = self.keep_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"keep_every = {every!r}: must be an int >= 1 or None")

    def keeps(self, step: int, newest: list[int]) -> bool:
        """Whether step survives, newest being the keep_last newest steps."""
        return step in newest or (self.keep_every is not None and step % self.keep_every == 0)


def doomed(
    root: str | os.PathLike[str],
    retention: Retention,
    protect: Iterable[Path] = (),
    upcoming: str | None = None,
) -> list[Path]:
    """The committed steps under root that a prune deletes, oldest first. upcoming: the directory
    name of a step not committed yet, counted as if it were, and as the one ``latest`` names."""
    root = Path(root)
    found = list_checkpoints(root)
    spared = {Path(p).name for p in protect}
    if upcoming is not None:
        m = STEP_RE.match(upcoming)
        if m is None:
            raise ValueError(f"upcoming = {upcoming!r}: not a step directory name")
        found = sorted([*found, (int(m.group(1)), root / upcoming)])
        spared.add(upcoming)
    newest = [s for s, _ in found[-retention.keep_last :]]
    marker = upcoming if upcoming is not None else latest_marker(root)
    if marker is not None:
        spared.add(marker)
    return [p for s, p in found if not retention.keeps(s, newest) and p.name not in spared]


def prune(
    root: str | os.PathLike[str], retention: Retention, *, protect: Iterable[Path] = (), dry_run: bool = False
) -> list[Path]:
    """Deletes the committed steps retention does not keep (see doomed()), then the abandoned
    temporary directories; returns both, in that order."""
    victims = doomed(root, retention, protect)
    left = abandoned(root)
    if dry_run:
        return victims + left
    for path in victims:
        gone = path.with_name(temp_dirname(path.name, deleting=True))
        os.rename(path, gone)  # out of the listing at once; the delete below may be slow
        shutil.rmtree(gone)
    for path in left:
        shutil.rmtree(path, ignore_errors=True)  # another prune may be removing it too
    return victims + left
