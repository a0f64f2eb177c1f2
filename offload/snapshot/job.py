"""One snapshot's work after ``snapshot()`` set it up: capture the host records, commit the data,
compute and commit the parity. Runs on a background thread (lazy) or inside the call.

Order, and why:

1. Each host record, in the order its next update runs: wait until the capture fence says it
   holds the snapshot's step (its update queued before the snapshot has run), copy master, m, v
   and step count into the segment, release it to the optimizer. The worker's ``hold`` keeps an
   update queued after the snapshot from changing a record before it is copied.
2. crc32 of each data chunk, then the header with ``step``: this rank's data is committed.
3. Every rank's crc32s and "captured" flag, gathered: a rank that failed leaves the others
   skipping the exchange rather than waiting for it (the group's collectives stay matched).
4. The parity exchange (parity.py), crc32 of each cell, then the header with ``parity_step``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from offload.checkpoint.capture import CaptureFence
from offload.engine.runtime import Runtime
from offload.snapshot import parity, payload
from offload.snapshot.client import Segment
from offload.snapshot.config import SnapshotHandle, SnapshotStats
from offload.snapshot.segment import Cell, Header
from offload.snapshot.topology import Topology
from offload.store.record import BlockRecord
from offload.utils import crc


@dataclass(slots=True, kw_only=True)
class SnapshotJob:
    rt: Runtime
    handle: SnapshotHandle
    seg: Segment
    header: Header  # the geometry; step and crcs are filled in here
    data: torch.Tensor  # the segment's k * chunk data bytes (uint8)
    cells: torch.Tensor  # its m * chunk parity bytes
    base: int  # payload offset of the records
    host: list[tuple[BlockRecord, payload.Span]]  # in the order their next updates run
    fence: CaptureFence | None  # None: the caller waited for every update (not lazy)
    topo: Topology
    pg: Any  # the snapshot process group (None on one rank)
    piece: int
    nbytes: int  # the payload's bytes
    t0: float
    call_s: float = 0.0
    capture_s: float = field(default=0.0)

    def run(self) -> None:
        parity_s = 0.0
        try:
            crcs = self._capture_and_commit()
            self.capture_s = time.perf_counter() - self.t0
            if self.pg is not None and self.topo.m > 0:
                t = time.perf_counter()
                self._parity(crcs)
                parity_s = time.perf_counter() - t
        except BaseException as e:
            self.handle._error = e
        finally:
            if self.fence is not None:
                self.fence.release(self.rt)
            self.handle._stats = SnapshotStats(
                step=self.handle.step,
                payload=self.nbytes,
                segment=self.seg.nbytes,
                call_s=self.call_s,
                hold_s=0.0 if self.fence is None else self.fence.hold_s,
                capture_s=self.capture_s,
                parity_s=parity_s,
                seconds=time.perf_counter() - self.t0,
            )
            self.handle._done.set()

    def _capture_and_commit(self) -> list[int] | None:
        """Captures the host records and commits the data; None when this rank failed (the others
        are told in ``_parity``, which every rank must reach)."""
        try:
            for rec, span in self.host:
                self._capture(rec, span)
            if self.fence is not None:
                self.fence.release(self.rt)
            k, chunk = self.header.k, self.header.chunk
            parts = [self.data[i * chunk : (i + 1) * chunk].numpy().data for i in range(k)]
            crcs = [crc.crc32(p) for p in parts]  # each on several threads (crc.py)
            self.header = replace(self.header, step=self.handle.step, crcs=tuple(crcs), payload=self.nbytes)
            self.seg.write_header(self.header)  # the commit of this rank's data
            return crcs
        except BaseException as e:
            if self.pg is None or self.topo.m == 0:
                raise
            self.handle._error = e
            return None

    def _capture(self, rec: BlockRecord, span: payload.Span) -> None:
        fence = self.fence
        if fence is not None:
            fence.wait_ready(rec)  # host wait: its update queued before the snapshot has run
            if self.rt.updater.fence is not fence:
                raise RuntimeError(
                    "another capture replaced this snapshot's capture fence while it was being "
                    "captured: the snapshot is void (offload.save waits for a snapshot in flight; "
                    "nothing else should set the optimizer's fence)"
                )
        payload.capture(self.rt, rec, payload.views(self.data, self.base, span))
        if fence is not None:
            fence.captured(rec)  # its next update may run now

    def _parity(self, crcs: list[int] | None) -> None:
        everyone = parity.gather_json(self.pg, crcs)
        failed = [r for r, c in enumerate(everyone) if c is None]
        if failed:
            if self.handle._error is None:
                self.handle._error = RuntimeError(
                    f"the snapshot of step {self.handle.step} failed on rank(s) {failed}: no parity"
                )
            return
        topo, h = self.topo, self.header
        parity.encode_stripes(self.pg, topo, self.data, self.cells, h.chunk, self.piece)
        cells = []
        for j in range(topo.m):
            stripe = topo.stripe_of_cell(topo.node, j)
            members = tuple(everyone[topo.group[topo.member(stripe, i)]][i] for i in range(topo.k))
            cell_crc = crc.crc32(self.cells[j * h.chunk : (j + 1) * h.chunk].numpy().data)
            cells.append(Cell(stripe=stripe, j=j, crc=cell_crc, members=members))
        self.header = replace(h, parity_step=self.handle.step, cells=tuple(cells))
        self.seg.write_header(self.header)  # the commit of this node's parity cells
