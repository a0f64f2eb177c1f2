"""Plan: the bytes a configuration will allocate per kind of state and tier, against the budgets.

Built by :func:`offload.plan.make_plan`; read as a table (``offload plan``) or as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from offload.cli._table import format_table
from offload.config import Config, Tier
from offload.plan.recompute import Choice
from offload.plan.shape import ModelShape
from offload.plan.tally import KINDS, STORE_KINDS, TIERS, spilled
from offload.utils.sizes import format_bytes

GiB = float(1 << 30)


class PlanError(ValueError):
    """A plan over its budgets, refused before anything is allocated; ``plan`` is the plan."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        lines = "\n".join(f"  {p}" for p in plan.problems)
        super().__init__(
            f"the model does not fit the budgets (batch {plan.batch_size} x seq {plan.seq_len}):\n"
            f"{lines}\n(`offload plan RECIPE` prints the whole plan; the budgets are offload.budgets.*, "
            "null for what this machine has)"
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """Per-rank bytes of each (kind, tier), the predicted peaks and what does not fit."""

    shape: ModelShape
    dtype: str
    batch_size: int
    seq_len: int
    grad_accum: int
    world_size: int
    placement: dict[str, Tier]
    """The tier each kind of state gets, with "auto" and not-yet-built tiers resolved."""
    device_blocks: int
    """Blocks whose whole state is on the compute device (placement.device_blocks, capped at the
    number of blocks)."""
    bytes: dict[tuple[str, Tier], int]
    """Bytes one rank allocates per (kind, tier); missing pairs are 0."""
    pinned_bytes: int
    """Capacity of one rank's pinned pool (the wire copies and gradients of the streamed records)."""
    needed: dict[Tier, int]
    """Predicted peak per tier for all ranks on this host (the gpu figure is per device)."""
    budgets: dict[Tier, int | None]
    """The budget each tier was checked against; None: unbounded."""
    problems: tuple[str, ...]
    """One line per tier over its budget: needed, budget, and the smallest changes that fit."""
    local_ranks: int = 1
    """Ranks on this host: ``needed`` adds up their host, cxl and nvme bytes."""
    notes: tuple[str, ...] = ()
    """What the plan assumed (a tier not built yet, what "auto" chose, a device that is the CPU)."""
    recompute: Choice | None = None
    """What each block keeps for its backward instead of being recomputed (its graph on the
    device or the host, its attention output), and the estimated step times
    (placement.offload_saved; None: never)."""
    residents_on_device: bool = False
    """The resident parameters keep their state on the device (placement.device_residents)."""
    spill_blocks: int = 0
    """Streamed blocks whose state leaves host RAM, the last ones (:attr:`spilled`): their m and
    v on ``placement["optimizer_state"]``, master on ``placement["master"]``, gradient sums on
    ``placement["gradients"]``. The others keep all their state in host RAM."""
    config: Config | None = None
    """The config the plan was made for (``Runtime.build`` checks it wraps with the same)."""

    @property
    def spilled(self) -> range:
        """Indices of the blocks whose state is spilled (what ``Runtime.tier_of`` follows)."""
        return spilled(self.shape.blocks, self.device_blocks, self.spill_blocks)

    def split(self) -> str:
        """Where each block's state lives, e.g. "2 blocks gpu, 12 blocks host, 12 blocks nvme";
        spilled blocks name what moved with their m and v: "12 blocks nvme (master, m and v)",
        "12 blocks host (master cxl, gradient sums cxl)"."""
        tier = self.placement["optimizer_state"]
        parts = [
            (self.device_blocks, "gpu"),
            (self.shape.blocks - self.device_blocks - self.spill_blocks, "host"),
        ]
        parts.append((self.spill_blocks, str(tier)))
        text = ", ".join(f"{n} blocks {where}" for n, where in parts if n)
        if not self.spill_blocks:
            return text
        if self.placement["master"] is Tier.NVME:
            text += " (master, m and v)"
        moved = []
        if self.placement["master"] is Tier.CXL:
            moved.append("master cxl")
        if self.placement["gradients"] is Tier.CXL:
            moved.append("gradient sums cxl")
        return text + (f" ({', '.join(moved)})" if moved else "")

    @property
    def fits(self) -> bool:
        return not self.problems

    def check(self) -> None:
        """Raises PlanError naming each tier over its budget and what would fit."""
        if self.problems:
            raise PlanError(self)

    def get(self, kind: str, tier: Tier) -> int:
        return self.bytes.get((kind, tier), 0)

    def store_bytes(self, tier: Tier) -> int:
        """Bytes of the store's records on tier: what ``BlockRecord.state_bytes`` adds up over the
        records (host and gpu), or what the nvme tier's files hold."""
        return sum(self.get(kind, tier) for kind in STORE_KINDS)

    def total(self, tier: Tier) -> int:
        return sum(self.get(kind, tier) for kind in KINDS)

    def table(self) -> str:
        """A readable table: kind x tier in GiB, totals, then needed against budget per tier."""
        s = self.shape
        head = (
            f"plan: {s.params / 1e9:.3f}B params, {s.blocks} blocks ({self.device_blocks} on the device), "
            f"{self.dtype}, batch {self.batch_size} x seq {self.seq_len}"
            + (f" x accum {self.grad_accum}" if self.grad_accum > 1 else "")
            + (
                f", {self.world_size} ranks ({self.local_ranks} on this host), streamed blocks sharded"
                if self.world_size > 1
                else ""
            )
        )
        place = "placement: " + ", ".join(f"{k} {v}" for k, v in self.placement.items())
        place += f"\noptimizer_state: {self.split()}"
        if self.recompute is not None:
            place += f"\noffload_saved: {self.recompute.describe()}"
        rows: list[list[object]] = [
            [kind, *(self.get(kind, t) / GiB for t in TIERS)]
            for kind in KINDS
            if any(self.get(kind, t) for t in TIERS)
        ]
        rows.append(["total per rank", *(self.total(t) / GiB for t in TIERS)])
        kinds = format_table(["kind", *(f"{t} GiB" for t in TIERS)], rows)
        peaks = format_table(
            ["tier", "needed GiB", "budget GiB", "fits"],
            [
                [
                    str(t),
                    self.needed[t] / GiB,
                    None if self.budgets[t] is None else self.budgets[t] / GiB,  # type: ignore[operator]
                    "yes" if self.budgets[t] is None or self.needed[t] <= self.budgets[t] else "NO",  # type: ignore[operator]
                ]
                for t in TIERS
            ],
        )
        pinned = f"pinned: {format_bytes(self.pinned_bytes)} per rank (the store's pool, inside host)"
        lines = [head, place, "", kinds, "", peaks, pinned]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"does not fit: {p}" for p in self.problems]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.shape.to_json(),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
            "local_ranks": self.local_ranks,
            "placement": {k: str(v) for k, v in self.placement.items()},
            "device_blocks": self.device_blocks,
            "residents_on_device": self.residents_on_device,
            "spill_blocks": self.spill_blocks,
            "spilled": [self.spilled.start, self.spilled.stop],
            "bytes": {kind: {str(t): self.get(kind, t) for t in TIERS} for kind in KINDS},
            "total_per_rank": {str(t): self.total(t) for t in TIERS},
            "pinned_bytes": self.pinned_bytes,
            "needed": {str(t): n for t, n in self.needed.items()},
            "budgets": {str(t): b for t, b in self.budgets.items()},
            "fits": self.fits,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "offload_saved": None if self.recompute is None else self.recompute.to_json(),
        }
