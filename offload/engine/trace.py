"""A per-step timeline in Chrome trace format (open in Perfetto or chrome://tracing).

Host work (optimizer updates, waits) is timed with the host clock; device work (compute, copies)
with CUDA events on its stream, converted to host time against one reference event, so both sit
on one time axis. Disabled, every span is a shared no-op context.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any

import torch

_NULL = contextlib.nullcontext()
LANES = {"compute": 1, "h2d": 2, "d2h": 3, "optimizer": 4, "host": 5, "io": 6}
# Device spans' lanes by name (else the name is the lane): a block's compute, plain or kept.
_DEVICE_LANES = {
    "forward": "compute",
    "recompute+backward": "compute",
    "forward+save": "compute",
    "backward": "compute",
    "sum": "d2h",
}


class Tracer:
    def __init__(self, path: str | None, device: torch.device) -> None:
        self.path = path
        self.enabled = path is not None
        self.cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._pending: list[tuple[str, str, Any, Any, dict[str, Any]]] = []
        self._t0 = time.perf_counter()
        self._base: Any = None
        self._base_us = 0.0
        if self.enabled and self.cuda:
            torch.cuda.synchronize(device)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
            self._base_us = self._now_us()

    def _now_us(self) -> float:
        return (time.perf_counter() - self._t0) * 1e6

    def span(self, name: str, lane: str, **args: Any) -> Any:
        """Times a piece of host work in lane (a name from LANES)."""
        if not self.enabled:
            return _NULL
        return self._host_span(name, lane, args)

    @contextlib.contextmanager
    def _host_span(self, name: str, lane: str, args: dict[str, Any]) -> Any:
        start = self._now_us()
        try:
            yield
        finally:
            self._add(name, lane, start, self._now_us() - start, args)

    def device_span(self, name: str, stream: Any, **args: Any) -> Any:
        """Times device work queued on stream inside the block (host time on the CPU)."""
        if not self.enabled:
            return _NULL
        lane = _DEVICE_LANES.get(name, name)
        if not self.cuda:
            return self._host_span(name, lane, args)
        return self._event_span(name, lane, stream, args)

    @contextlib.contextmanager
    def _event_span(self, name: str, lane: str, stream: Any, args: dict[str, Any]) -> Any:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            with self._lock:
                self._pending.append((name, lane, start, end, args))

    def _add(self, name: str, lane: str, ts: float, dur: float, args: dict[str, Any]) -> None:
        event = {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": 0, "tid": LANES[lane], "args": args}
        with self._lock:
            self._events.append(event)

    def resolve(self) -> None:
        """Turns finished device spans into events (synchronises the device)."""
        if not self._pending:
            return
        torch.cuda.synchronize()
        with self._lock:
            pending, self._pending = self._pending, []
        for name, lane, start, end, args in pending:
            ts = self._base_us + self._base.elapsed_time(start) * 1e3
            self._add(name, lane, ts, start.elapsed_time(end) * 1e3, args)

    def events(self) -> list[dict[str, Any]]:
        self.resolve()
        with self._lock:
            return list(self._events)

    def summary(self, start_us: float = float("-inf"), end_us: float = float("inf")) -> dict[str, float]:
        """Busy seconds per lane (overlapping spans in one lane counted once), of the spans'
        parts between start_us and end_us on the trace's clock (default: all of them)."""
        busy: dict[str, float] = {}
        names = {v: k for k, v in LANES.items()}
        by_lane: dict[str, list[tuple[float, float]]] = {}
        for e in self.events():
            a, b = max(e["ts"], start_us), min(e["ts"] + e["dur"], end_us)
            if b > a:
                by_lane.setdefault(names[e["tid"]], []).append((a, b))
        for lane, spans in by_lane.items():
            total, end = 0.0, -1.0
            for a, b in sorted(spans):
                if b > end:
                    total += b - max(a, end)
                    end = b
            busy[lane] = total / 1e6
        return busy

    def write(self, path: str | None = None) -> str | None:
        path = path or self.path
        if not path:
            return None
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": lane}}
            for lane, tid in LANES.items()
        ]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + self.events(), "displayTimeUnit": "ms"}, f)
        return path
