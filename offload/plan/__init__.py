"""The placement planner: bytes per kind of state and per tier, checked against the budgets.

``make_plan(model_on_meta, cfg, batch_size=..., seq_len=...)`` returns a :class:`Plan` without
allocating anything; ``offload plan RECIPE.yaml`` prints one (docs/plan.md).
"""

from offload.plan.account import Accounting, Figure, account
from offload.plan.plan import Plan, PlanError
from offload.plan.planner import make_plan
from offload.plan.shape import ModelShape, model_shape
from offload.plan.tally import HOST_OVERHEAD_BYTES, KINDS, STORE_KINDS, TIERS

__all__ = [
    "HOST_OVERHEAD_BYTES",
    "KINDS",
    "STORE_KINDS",
    "TIERS",
    "Accounting",
    "Figure",
    "ModelShape",
    "Plan",
    "PlanError",
    "account",
    "make_plan",
    "model_shape",
]
