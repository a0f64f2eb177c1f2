"""offload.train.schedule: warmup and decay factors against hand-computed values."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from offload.config import ConfigError, from_dict
from offload.train.schedule import ScheduleSpec, lr_factor, make_scheduler

# cos(pi/4) = sqrt(2)/2, so with floor 0.1 the cosine factor at p = 1/4 is 0.1 + 0.45 (1 + 0.70710678).
COSINE_WARM2_TOTAL6_MIN01 = [0.5, 1.0, 1.0, 0.86819805, 0.55, 0.23180195, 0.1, 0.1]
LINEAR_TOTAL4 = [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
LINEAR_WARM3_TOTAL5_MIN05 = [1 / 3, 2 / 3, 1.0, 1.0, 0.75, 0.5, 0.5]
CONSTANT_WARM4 = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "total", "expected"),
    [
        (ScheduleSpec(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 6, COSINE_WARM2_TOTAL6_MIN01),
        (ScheduleSpec(name="linear"), 4, LINEAR_TOTAL4),
        (ScheduleSpec(name="linear", warmup_steps=3, min_lr_ratio=0.5), 5, LINEAR_WARM3_TOTAL5_MIN05),
        (ScheduleSpec(name="constant", warmup_steps=4), 6, CONSTANT_WARM4),
        (ScheduleSpec(), 3, [1.0, 1.0, 1.0]),
    ],
)
def test_lr_factor(spec: ScheduleSpec, total: int, expected: list[float]) -> None:
    got = [lr_factor(spec, total, step) for step in range(len(expected))]
    assert got == pytest.approx(expected, abs=1e-8)


def test_cosine_midpoint_and_monotone() -> None:
    spec = ScheduleSpec(name="cosine", warmup_steps=10, min_lr_ratio=0.0)
    assert lr_factor(spec, 110, 60) == pytest.approx(0.5)
    values = [lr_factor(spec, 110, s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.0)


def test_warmup_equal_to_total_steps_leaves_no_decay() -> None:
    spec = ScheduleSpec(name="cosine", warmup_steps=4)
    assert [lr_factor(spec, 4, s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def _run(optimizer: Any, scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_make_scheduler_drives_a_torch_optimizer() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.2)
    sched = make_scheduler(opt, ScheduleSpec(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 6)
    lrs = _run(opt, sched, 7)
    assert lrs == pytest.approx([0.2 * f for f in COSINE_WARM2_TOTAL6_MIN01[:7]])
    assert opt.param_groups[0]["initial_lr"] == 0.2


class FakeOptimizer:
    """Not a torch Optimizer: just param groups and a step(), like the offload engine's optimizer."""

    def __init__(self, lrs: list[float]) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": lr} for lr in lrs]
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


def test_make_scheduler_drives_any_object_with_param_groups() -> None:
    opt = FakeOptimizer([1.0, 0.5])
    sched = make_scheduler(opt, ScheduleSpec(name="linear"), 4)
    lrs = _run(opt, sched, 4)
    assert lrs == pytest.approx(LINEAR_TOTAL4[:4])
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0)
    assert [g["initial_lr"] for g in opt.param_groups] == [1.0, 0.5]
    assert opt.steps == 4


def test_make_scheduler_refuses_what_is_not_an_optimizer() -> None:
    with pytest.raises(TypeError, match="object has no param_groups"):
        make_scheduler(object(), ScheduleSpec(), 10)


def test_scheduler_resumes_from_its_state_dict() -> None:
    spec = ScheduleSpec(name="cosine", warmup_steps=3, min_lr_ratio=0.2)
    opt = FakeOptimizer([1.0])
    sched = make_scheduler(opt, spec, 20)
    _run(opt, sched, 8)
    state = sched.state_dict()
    expected = _run(opt, sched, 5)

    resumed = FakeOptimizer([1.0])
    sched2 = make_scheduler(resumed, spec, 20)
    sched2.load_state_dict(state)
    resumed.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert _run(resumed, sched2, 5) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("total", "message"),
    [(0, r"total_steps = 0: must be >= 1"), (5, r"schedule\.warmup_steps = 10: more than the run's 5 steps")],
)
def test_make_scheduler_errors(total: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_scheduler(FakeOptimizer([1.0]), ScheduleSpec(warmup_steps=10), total)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "step"}, "schedule.name = 'step': expected one of 'constant', 'linear', 'cosine'"),
        ({"warmup_steps": -1}, "schedule.warmup_steps = -1: must be >= 0"),
        ({"warmup_steps": 1.5}, "schedule.warmup_steps = 1.5: expected int, got float"),
        ({"min_lr_ratio": 1.5}, "schedule.min_lr_ratio = 1.5: must be in [0, 1]"),
        (
            {"decay": "cosine"},
            "schedule.decay = 'cosine': unknown field; valid fields here: name, warmup_steps",
        ),
    ],
)
def test_spec_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(ScheduleSpec, data, "schedule")
    assert str(e.value).startswith(message), str(e.value)


def test_factor_is_finite_everywhere() -> None:
    for name in ("constant", "linear", "cosine"):
        spec = from_dict(ScheduleSpec, {"name": name, "warmup_steps": 5, "min_lr_ratio": 0.3})
        for step in range(0, 50):
            f = lr_factor(spec, 40, step)
            assert math.isfinite(f) and 0.0 < f <= 1.0
