"""Which streamed blocks spill, and where each kind of their state goes.

The spilled blocks are the last ``P`` streamed blocks (``tally.spilled``); each kind of their
state goes to the tier placement names for it: m and v to ``optimizer_state`` (host, cxl, nvme),
the fp32 master to ``master`` (host, cxl, or nvme in the files of m and v), the fp32 gradient sum
to ``gradients`` (host or cxl). The other blocks keep everything in host RAM. ``P`` is
``spill_blocks`` when given, every streamed block when a tier is named, and for
``optimizer_state: auto`` the fewest that fit the host budget: the coldest state first (m and v
to cxl when cxl_nodes are named and the cxl budget holds them, else to nvme), then, with
``master: auto``, the masters with them, and on cxl, with ``gradients: auto`` and micro-batches
accumulated, the gradient sums last (docs/plan.md).
"""

from __future__ import annotations

from collections.abc import Callable

from offload.config import Config, Tier
from offload.plan.shape import ModelShape
from offload.plan.tally import Settings
from offload.utils.sizes import format_bytes

Needs = Callable[[Settings], dict[Tier, int]]
"""From settings to the predicted peak of each tier (planner._needs)."""


def choose_spill(
    shape: ModelShape,
    cfg: Config,
    s: Settings,
    need: Needs,
    budget: int | None,
    notes: list[str],
    cxl_budget: int | None = None,
) -> Settings:
    """s with the spill decided (Settings.optimizer, master, grad_sums, spill_blocks); budget:
    the host's, cxl_budget the cxl tier's (None: unbounded)."""
    p = cfg.placement
    streamed = shape.blocks - s.device_blocks
    given = streamed if p.spill_blocks is None else min(p.spill_blocks, streamed)
    sums = Tier.CXL if p.gradients is Tier.CXL else Tier.HOST
    masters: list[Tier]
    if p.master in (Tier.CXL, Tier.NVME):
        masters = [p.master]
    else:  # host, or auto: to nvme with m and v when they are not enough (never in float32)
        masters = [Tier.HOST, Tier.NVME] if p.master is Tier.AUTO and s.item != 4 else [Tier.HOST]

    def fits(c: Settings) -> bool:
        return budget is None or need(c)[Tier.HOST] <= budget

    def first_fit(candidates: list[Settings]) -> Settings:
        return next((c for c in candidates if fits(c)), candidates[-1])

    def to(tier: Tier, k: int) -> list[Settings]:
        """The candidates with the last k blocks' m and v on tier, masters as allowed there."""
        allowed: list[Tier] = [m for m in masters if m is not Tier.NVME or tier is Tier.NVME] or [Tier.HOST]
        return [spilling(s, tier, k, m, sums) for m in allowed]

    asked = p.optimizer_state
    if asked in (Tier.NVME, Tier.CXL):
        return first_fit(to(asked, given))
    if asked is not Tier.AUTO:
        if asked is not Tier.HOST:
            notes.append(f"optimizer_state {asked} is not built: the runtime keeps it in host RAM")
        return to(Tier.HOST, given)[0]  # masters or gradient sums named cxl still spill
    if p.spill_blocks is not None:
        notes.append(f"optimizer_state auto: spill_blocks {given} given")
        return first_fit(to(Tier.NVME, given))
    if fits(s):
        rest = "; no block spills, so masters and gradient sums stay there too" if _named(cfg) else ""
        notes.append(f"optimizer_state auto: host (it fits the host budget){rest}")
        return s
    if cfg.cxl_nodes:  # memory before a disk: the fewest blocks' m and v to cxl that fit both budgets
        # (then, with master auto and not in float32, the masters there with them; then, with
        # gradients auto and micro-batches accumulated, the gradient sums: they are hot, read and
        # written every micro-batch, so they go last)
        cxl_masters = [Tier.HOST, Tier.CXL] if p.master is Tier.AUTO and s.item != 4 else [Tier.HOST]
        combos = [(m, sums) for m in cxl_masters]
        if p.gradients is Tier.AUTO and s.grad_accum > 1 and not s.sums_on_device:
            combos.append((cxl_masters[-1], Tier.CXL))
        on_cxl = [spilling(s, Tier.CXL, k, m, g) for m, g in combos for k in range(1, streamed + 1)]
        chosen = next(
            (c for c in on_cxl if fits(c) and (cxl_budget is None or need(c)[Tier.CXL] <= cxl_budget)), None
        )
        if chosen is not None:
            notes.append(
                f"optimizer_state auto: the last {chosen.spill_blocks} of {streamed} streamed blocks keep "
                f"their {describe(chosen)} (the fewest that fit the host budget; cxl memory before a disk)"
            )
            return chosen
        if not cfg.nvme_dirs and on_cxl:  # no disk to go on to: as much as cxl takes, and say so
            notes.append(
                f"optimizer_state auto: every streamed block spilled ({describe(on_cxl[-1])}), and still "
                "over the host or cxl budget (no nvme_dirs named)"
            )
            return on_cxl[-1]
    tier = Tier.NVME if cfg.nvme_dirs else Tier.HOST
    choices = [c for k in range(1, streamed + 1) for c in to(tier, k) if c.spilled(shape.blocks)]
    choices.sort(key=lambda c: (c.master is Tier.NVME, c.spill_blocks))  # m and v before masters
    if not choices:
        notes.append("optimizer_state auto: host, as no nvme_dirs are named (it does not fit there)")
        return s
    chosen = first_fit(choices)
    if fits(chosen):
        notes.append(
            f"optimizer_state auto: the last {chosen.spill_blocks} of {streamed} streamed blocks keep "
            f"their {describe(chosen)} (the fewest that fit the host budget)"
        )
    else:
        notes.append(
            f"optimizer_state auto: every streamed block spilled ({describe(chosen)}), and still "
            "over the host budget"
        )
    return chosen


def spilling(s: Settings, optimizer: Tier, k: int, master: Tier, sums: Tier) -> Settings:
    """s with the last k streamed blocks' m and v on optimizer, masters on master, gradient sums
    on sums (k 0, or every kind on the host: nothing spills)."""
    if k == 0 or optimizer is master is sums is Tier.HOST:
        return s.but(optimizer=Tier.HOST, spill_blocks=None, master=Tier.HOST, grad_sums=Tier.HOST)
    return s.but(optimizer=optimizer, spill_blocks=k, master=master, grad_sums=sums)


def describe(s: Settings) -> str:
    """Where the spilled blocks' state is: "m and v on nvme", "master, m and v on nvme",
    "m and v on nvme, master on cxl", "m and v on host, gradient sums on cxl"."""
    both = "master, m and v" if s.master is Tier.NVME else "m and v"
    parts = [f"{both} on {s.optimizer}"]
    if s.master is Tier.CXL:
        parts.append("master on cxl")
    if s.grad_sums is Tier.CXL:
        parts.append("gradient sums on cxl")
    return ", ".join(parts)


def _named(cfg: Config) -> bool:
    """A tier is named for the masters or gradient sums (they spill only with their blocks)."""
    return cfg.placement.master is Tier.CXL or cfg.placement.gradients is Tier.CXL


# ---- what would fit --------------------------------------------------------------------------------


def fits_all(need: dict[Tier, int], budgets: dict[Tier, int | None]) -> bool:
    return all(b is None or need[t] <= b for t, b in budgets.items())


def spill_fixes(
    tier: Tier, shape: ModelShape, s: Settings, cfg: Config, need: Needs, budgets: dict[Tier, int | None]
) -> list[str]:
    """Changes of the spill that would make tier fit (host: more state off it; nvme, cxl: less
    state on them). The cxl fixes are offered where cxl_nodes are named (a machine with CXL)."""
    budget = budgets[tier]
    assert budget is not None
    streamed = shape.blocks - min(s.device_blocks, shape.blocks)
    spilled = len(s.spilled(shape.blocks))
    fixes = []
    if tier is Tier.HOST and spilled < streamed:
        nvme = [spilling(s, Tier.NVME, k, s.master, s.grad_sums) for k in range(spilled + 1, streamed + 1)]
        alt = next((c for c in nvme if need(c)[Tier.HOST] <= budget), None)
        if alt is not None:
            extra = "" if cfg.nvme_dirs else " and name nvme_dirs"
            fixes.append(
                f"put the last {alt.spill_blocks} blocks' optimizer_state on nvme (optimizer_state auto, or "
                f"nvme with spill_blocks {alt.spill_blocks}: needs {format_bytes(need(alt)[Tier.NVME])} "
                f"of nvme{extra})"
            )
    k = spilled or streamed  # master or gradients cxl spill these blocks (all, when none spill yet)
    if tier is Tier.HOST and cfg.cxl_nodes:
        moves = []
        if s.master is Tier.HOST and s.item != 4:
            moves.append(("masters", "master", spilling(s, s.optimizer, k, Tier.CXL, s.grad_sums)))
        if s.grad_sums is Tier.HOST and s.grad_accum > 1 and not s.sums_on_device:
            moves.append(("gradient sums", "gradients", spilling(s, s.optimizer, k, s.master, Tier.CXL)))
        for what, field, alt in moves:
            if fits_all(need(alt), budgets):
                fixes.append(
                    f"put the last {k} blocks' {what} on cxl ({field} cxl: needs "
                    f"{format_bytes(need(alt)[Tier.CXL])} of cxl)"
                )
    if tier in (Tier.NVME, Tier.CXL):
        fewer = next(
            (j for j in range(spilled - 1, 0, -1) if fits_all(need(s.but(spill_blocks=j)), budgets)), None
        )
        if fewer is not None:
            fixes.append(f"lower placement.spill_blocks to {fewer}")
        master = Tier.HOST if s.master is Tier.NVME else s.master  # an nvme master is in m, v's file
        back = [("optimizer_state", spilling(s, Tier.HOST, k, master, s.grad_sums))]
        back += [("master", spilling(s, s.optimizer, k, Tier.HOST, s.grad_sums))]
        back += [("gradients", spilling(s, s.optimizer, k, s.master, Tier.HOST))]
        for field, alt in back:
            if getattr(s, _SETTING[field]) is tier and fits_all(need(alt), budgets):
                fixes.append(f"put {field} on host")
    return fixes


_SETTING = {"optimizer_state": "optimizer", "master": "master", "gradients": "grad_sums"}
