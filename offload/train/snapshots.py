"""In-memory snapshots in ``offload train`` (``train.snapshot``; docs/snapshot.md, "In offload train").

A Snapshotter kept next to the run: on start it restores the newest snapshot of the job the
keepers hold (or parity can rebuild; when more nodes are lost than parity covers, the newest step
on disk: a snapshot flushed to flush_dir, or the run's own checkpoint in train.checkpoint_dir),
with the data position and the recipe fingerprint the trainer put in its extra; after each
optimizer step it takes one when ``every`` says so. A run that finishes drops its job's snapshots
from the keepers, so that the next run of the recipe starts fresh; one that stops on an error
first lets the snapshot in flight commit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload.checkpoint.format import CheckpointError
from offload.snapshot import flush
from offload.snapshot.config import SnapshotConfig
from offload.train.ranks import Ranks

if TYPE_CHECKING:
    from offload.snapshot.recovery import Restored

Log = Callable[[str], None]


class SnapshotGone(CheckpointError):
    """The job's snapshot is lost, and neither flush_dir nor the checkpoint directory holds a step
    every rank can load (a --resume checkpoint elsewhere may still do)."""


class Snapshots:
    """The run's Snapshotter (a collective to make: every rank makes one). checkpoints: the run's
    checkpoint directory, where the disk fallback also looks (unless the config names another)."""

    def __init__(
        self,
        cfg: SnapshotConfig,
        name: str,
        model: Any,
        opt: Any,
        ranks: Ranks,
        checkpoints: str | None = None,
    ) -> None:
        from offload.snapshot import Snapshotter

        cfg = replace(cfg, job=name) if cfg.job == "default" else cfg
        self.cfg = replace(cfg, checkpoint_dir=checkpoints) if cfg.checkpoint_dir is None else cfg
        self.ranks = ranks
        self.snap = Snapshotter(model, opt, self.cfg)
        self.taken = 0
        # A preemption's SIGTERM flushes the newest snapshot to flush_dir first (when one is named;
        # only the main thread may install a handler); the run's end puts the old handler back.
        self._uninstall: Callable[[], None] = lambda: None
        if self.cfg.flush_dir is not None and threading.current_thread() is threading.main_thread():
            self._uninstall = self.snap.install_sigterm()

    def restore(self, sched: Any, fingerprint: dict[str, Any], steps: int) -> Restored | None:
        """Loads the newest snapshot of the job into the run (Restored: where from, the step, the
        extra), or None when there is none. Raises SnapshotGone when it is lost with nothing on
        disk to fall back to, CheckpointError when it cannot be restored or was taken by another
        recipe (naming the fields that differ) or is already at steps."""
        from offload.snapshot import KeeperError, RestoreFailed, SnapshotLost, SnapshotMismatch

        job = self.cfg.job
        try:
            restored = self.snap.restore(scheduler=sched)
        except SnapshotLost as e:
            raise SnapshotGone(f"cannot restore the snapshot of job '{job}': {e}") from e
        except (KeeperError, SnapshotMismatch, RestoreFailed) as e:  # the last: another rank's failure
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
        return restored

    def resuming(self, got: Restored) -> str:
        """The line the trainer logs for a restored snapshot."""
        job, step = self.cfg.job, got.step
        if got.source == "disk":
            return f"resuming from {got.path} (step {step}): the keepers cannot restore the snapshot of job '{job}'"
        if got.rebuilt:
            rebuilt = f"ranks {list(got.rebuilt)} rebuilt from parity"
            return f"resuming from the snapshot of job '{job}', {rebuilt} (step {step})"
        keepers = "the keeper" if self.ranks.world == 1 else "the keepers"
        return f"resuming from the snapshot of job '{job}', from {keepers} (step {step})"

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
        committed its last one (a rank's keeper may serve the others of its node), and each rank's
        flushed files from flush_dir, so that the recipe run again starts fresh."""
        self._uninstall()
        self.snap.wait()
        self.ranks.barrier()
        client = self.snap.client
        for seg in self.snap.segments.values():
            seg.close()
        self.snap.segments.clear()
        client.drop(self.cfg.job)
        if self.cfg.flush_dir is not None:
            flush.remove(Path(self.cfg.flush_dir), self.cfg.job, self.ranks.rank)
        self.snap.close()
