"""Recycling surplus steps: what a save with ``prune="before"`` does before it writes.

With ``keep_last=K`` a save normally writes step N next to the K steps it keeps and prunes the
oldest after its commit (retention.py): the disk holds K + 1 checkpoints at the peak, and the
next save writes fresh blocks while the pruned step's blocks are being freed. Both cost the
writes dearly on a thin virtual disk (ext4 mounted with ``discard``; measured in
docs/checkpoint.md): writing into freshly allocated blocks ran at half the speed of overwriting
blocks a file already holds, and about a third slower again while another file was unlinked.

A save with ``prune="before"`` instead takes the steps its commit will make surplus out of the
listing when it starts, and writes each of its files over the surplus step's file of the same
name, in place (a record's file keeps its name and size from step to step): nothing is unlinked,
discarded or allocated while the bytes move. The price: while it runs, the root holds K - 1
committed steps (none with ``keep_last=1``); a save that fails, or a process killed meanwhile,
leaves only those.

Order, so that a reader never sees half a step and ``latest`` never names a step that is gone:

1. ``latest`` is removed if it names a surplus step (``load(root)`` then takes the newest
   committed one), and the root fsynced;
2. each surplus step is renamed to ``step_N.tmp-del-<uuid>.<pid>@<host>`` (out of the listing at
   once), and so is each temporary directory a killed save or prune left behind
   (``format.abandoned``: on a disk that holds one checkpoint, the files of a save killed halfway
   would otherwise leave no room for the next one); the root fsynced;
3. of their files, the first of each name that the save writes is kept for it (surplus steps
   first, oldest first); everything else (manifests, files of other names, duplicates) is deleted
   now, before the writes start, not while they run;
4. the save ``claim``s each kept file by renaming it into its temporary directory;
5. after the commit (or a failure), ``close`` removes what is left of the taken directories.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from offload.checkpoint.format import LATEST, TEMP_RE, abandoned, fsync_dir, latest_marker, temp_dirname


@dataclass(slots=True)
class Recycler:
    """The surplus steps a save has taken out of the listing, and their files it may write over."""

    taken: list[Path] = field(default_factory=list)
    """The renamed (``.tmp-del-``) directories, removed by close()."""
    files: dict[str, Path] = field(default_factory=dict)
    """File name -> a kept file of that name under ``taken[0]``, until claimed."""

    @classmethod
    def take(cls, root: Path, steps: list[Path], names: Collection[str]) -> Recycler:
        """Takes steps (committed directories under root) out of the listing, and the abandoned
        temporary directories under root, and keeps one file of each name in names; deletes the
        rest. On an error the directories already taken are removed (they are out of the listing:
        nothing of them counts any more) and it is raised."""
        recycler = cls()
        try:
            recycler._take(root, steps, set(names))
        except BaseException:
            recycler.close(ignore_errors=True)
            raise
        return recycler

    def _take(self, root: Path, steps: list[Path], names: set[str]) -> None:
        left = abandoned(root)
        if not steps and not left:
            return
        if latest_marker(root) in {p.name for p in steps}:
            (root / LATEST).unlink()
            fsync_dir(root)  # latest is gone before the step it names is
        for path in steps + left:
            m = TEMP_RE.match(path.name)
            gone = root / temp_dirname(m.group(1) if m else path.name, deleting=True)
            try:
                os.rename(path, gone)  # a step: out of the listing; a leftover: ours now
            except FileNotFoundError:
                if path in steps:
                    raise
                continue  # a leftover another save or prune took first
            self.taken.append(gone)
        fsync_dir(root)
        for d in self.taken:
            for entry in sorted(d.iterdir()):
                regular = entry.is_file() and not entry.is_symlink()
                if regular and entry.name in names and entry.name not in self.files:
                    self.files[entry.name] = entry
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    @property
    def nbytes(self) -> int:
        """Bytes held by the files still unclaimed."""
        return sum(p.stat().st_size for p in self.files.values())

    def claim(self, name: str, dest: Path) -> bool:
        """Moves the kept file called name to dest (which must not exist); False: there is none."""
        src = self.files.pop(name, None)
        if src is None:
            return False
        if dest.exists():
            raise FileExistsError(f"{dest} already exists")
        os.rename(src, dest)
        return True

    def close(self, ignore_errors: bool = False) -> None:
        """Removes the taken directories and whatever is left in them."""
        while self.taken:
            shutil.rmtree(self.taken[-1], ignore_errors=ignore_errors)
            self.taken.pop()
        self.files.clear()
