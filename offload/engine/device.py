"""Streams and events of the compute device, with the same calls on the CPU (where they are
synchronous no-ops), so the engine has one code path for both."""

from __future__ import annotations

from typing import Any

import torch


class Device:
    def __init__(self, spec: str) -> None:
        self.torch = torch.device(spec)
        self.cuda = self.torch.type == "cuda"
        if self.cuda:
            if self.torch.index is None:
                self.torch = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.torch)
            self.h2d: Any = torch.cuda.Stream(self.torch)
            self.d2h: Any = torch.cuda.Stream(self.torch)
        else:
            self.h2d = self.d2h = None

    def compute_stream(self) -> Any:
        # The caller's current stream: autograd runs backward on the stream forward used.
        return torch.cuda.current_stream(self.torch) if self.cuda else None

    def event(self, stream: Any) -> Any:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, stream: Any, event: Any) -> None:
        if event is not None:
            stream.wait_event(event)

    @staticmethod
    def event_done(event: Any) -> bool:
        """Whether the work before event has finished (None: nothing to wait for)."""
        return event is None or bool(event.query())

    @staticmethod
    def sync_event(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def stream(self, stream: Any) -> Any:
        """Context that makes stream current (a no-op on the CPU)."""
        if self.cuda:
            return torch.cuda.stream(stream)
        return _Null()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.torch) if self.cuda else None
        return torch.get_rng_state(), cuda

    def set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.torch)

    def fork_rng(self) -> Any:
        return torch.random.fork_rng(devices=[self.torch] if self.cuda else [], device_type=self.torch.type)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
