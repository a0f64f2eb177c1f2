"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay to a floor.

The schedule is a pure function of the step (:func:`lr_factor`), wrapped in torch's ``LambdaLR`` so
it saves and resumes like any torch scheduler. It only touches ``param_groups`` ("lr" and
"initial_lr"), so it also drives optimizers that are not ``torch.optim.Optimizer`` subclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from offload.config import ConfigError, check_fields

__all__ = ["ScheduleSpec", "lr_factor", "make_scheduler"]


@dataclass(kw_only=True, slots=True)
class ScheduleSpec:
    """How the learning rate moves over a run, as a multiple of the optimizer's lr."""

    name: Literal["constant", "linear", "cosine"] = "constant"
    """Shape after warmup: hold, fall linearly, or fall along half a cosine."""
    warmup_steps: int = 0
    """Steps of linear warmup from lr/warmup_steps up to lr."""
    min_lr_ratio: float = 0.0
    """Where linear and cosine decay end, as a fraction of lr (reached after the last step)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", self.warmup_steps, "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


def lr_factor(spec: ScheduleSpec, total_steps: int, step: int) -> float:
    """The multiple of the base lr for the update at step (0-based) of a run of total_steps.

    Warmup: (step + 1) / warmup_steps for the first warmup_steps steps. Then, with progress
    p = (step - warmup_steps) / (total_steps - warmup_steps): constant 1; linear
    1 - (1 - min) p; cosine min + (1 - min) (1 + cos(pi p)) / 2. p reaches 1 after the last step.
    """
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    floor = spec.min_lr_ratio
    if spec.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: Any, spec: ScheduleSpec, total_steps: int) -> LambdaLR:
    """A LambdaLR applying spec over total_steps to optimizer's param groups.

    optimizer may be any object with ``param_groups`` (dicts with "lr") and ``step()``; torch's
    schedulers insist on an Optimizer subclass, so other objects are seen through a thin view that
    shares their param_groups.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps = {total_steps}: must be >= 1")
    if spec.warmup_steps > total_steps:
        raise ValueError(
            f"schedule.warmup_steps = {spec.warmup_steps}: more than the run's {total_steps} steps"
        )
    target = optimizer if isinstance(optimizer, torch.optim.Optimizer) else _GroupsView(optimizer)
    return LambdaLR(target, lambda step: lr_factor(spec, total_steps, step))


class _GroupsView(torch.optim.Optimizer):
    """An Optimizer in name only: shares another optimizer's param_groups so LambdaLR can drive it.

    Optimizer.__init__ is skipped on purpose: it would copy the groups, and LambdaLR must write "lr"
    into the very dicts the real optimizer reads.
    """

    def __init__(self, inner: Any) -> None:
        if not hasattr(inner, "param_groups"):
            raise TypeError(f"{type(inner).__name__} has no param_groups: not an optimizer")
        self.inner = inner
        self.param_groups = inner.param_groups
        self.defaults: dict[str, Any] = {}
        self.state: Any = {}
        # LambdaLR warns when its first step() comes before the optimizer's; it cannot see the inner
        # optimizer's calls, so the view reports them as made.
        self._opt_called = True

    def step(self, closure: Any = None) -> Any:
        return self.inner.step() if closure is None else self.inner.step(closure)
