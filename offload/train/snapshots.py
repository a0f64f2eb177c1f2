"""In-memory snapshots in ``offload train`` (``train.snapshot``; docs/snapshot.md, "In offload train").

A Snapshotter kept next to the run: on start it restores the newest snapshot of the job the
keepers hold (or parity can rebuild, or flush_dir has on disk), with the data position and the
recipe fingerprint the trainer put in its extra; after each optimizer step it takes one when
``every`` says so. A run that finishes drops its job's snapshots from the keepers, so that the next
run of the recipe starts fresh; one that stops on an error first lets the snapshot in flight commit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from offload.checkpoint.format import CheckpointError
from offload.snapshot.config import SnapshotConfig
from offload.train.ranks import Ranks

Log = Callable[[str], None]


class Snapshots:
    """The run's Snapshotter (a collective to make: every rank makes one)."""

    def __init__(self, cfg: SnapshotConfig, name: str, model: Any, opt: Any, ranks: Ranks) -> None:
        from offload.snapshot import Snapshotter

        self.cfg = replace(cfg, job=name) if cfg.job == "default" else cfg
        self.ranks = ranks
        self.snap = Snapshotter(model, opt, self.cfg)
        self.taken = 0
        # A preemption's SIGTERM flushes the newest snapshot to flush_dir first (when one is named;
        # only the main thread may install a handler); the run's end puts the old handler back.
        self._uninstall: Callable[[], None] = lambda: None
        if self.cfg.flush_dir is not None and threading.current_thread() is threading.main_thread():
            self._uninstall = self.snap.install_sigterm()

    def restore(
        self, sched: Any, fingerprint: dict[str, Any], steps: int
    ) -> tuple[str, int, dict[str, Any]] | None:
        """Loads the newest snapshot of the job into the run: (source, step, extra), or None when
        there is none. Raises CheckpointError when it cannot be restored or was taken by another
        recipe (naming the fields that differ) or is already at steps."""
        from offload.snapshot import KeeperError, SnapshotLost, SnapshotMismatch

        job = self.cfg.job
        try:
            restored = self.snap.restore(scheduler=sched)
        except (KeeperError, SnapshotLost, SnapshotMismatch) as e:
            raise CheckpointError(f"cannot restore the snapshot of job '{job}': {e}") from e
        if restored.step is None:
            return None
        where = f"the snapshot of job '{job}' (step {restored.step}, {restored.source})"
        extra = restored.extra
        saved = extra.get("recipe")
        if not isinstance(saved, dict) or "data" not in extra:
            raise CheckpointError(
                f"{where} was not taken by offload train (no recipe or data position in it): "
                f"give this run another train.snapshot.job"
            )
        from offload.train.trainer import differences

        diffs = [
            f"{k}: snapshot {a!r}, recipe {b!r}"
            for k, a, b in differences(saved, fingerprint)
            if k != "steps"
        ]
        if diffs:
            raise CheckpointError(f"{where} was taken by a different recipe: {'; '.join(diffs)}")
        if restored.step >= steps:
            raise CheckpointError(f"{where} is already at train.steps = {steps}: raise train.steps to go on")
        return restored.source, restored.step, extra

    def after_step(self, step: int, sched: Any, extra: dict[str, Any]) -> None:
        """Takes a snapshot of step if it is due (call after optimizer.step() and sched.step())."""
        if self.snap.maybe_snapshot(step, scheduler=sched, extra=extra) is not None:
            self.taken += 1

    def before_save(self) -> None:
        """Waits for the snapshot in flight: a checkpoint save would replace its capture fence."""
        self.snap.wait_idle()

    def settle(self) -> None:
        """The run stops on an error: the snapshot in flight commits (its error is printed)."""
        self._uninstall()
        with contextlib.suppress(Exception):
            self.snap.close()

    def finish(self) -> None:
        """The run is done: its snapshots are dropped from the keepers once every rank has
        committed its last one (a rank's keeper may serve the others of its node)."""
        self._uninstall()
        self.snap.wait()
        self.ranks.barrier()
        client = self.snap.client
        for seg in self.snap.segments.values():
            seg.close()
        self.snap.segments.clear()
        client.drop(self.cfg.job)
        self.snap.close()
