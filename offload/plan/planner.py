"""make_plan: where each kind of state goes and how many bytes each tier needs, without allocating.

The model is only read (it may live on the meta device). The planner decides what the runtime
does (``Runtime.build`` makes or takes a plan and follows it): the first ``device_blocks``
blocks keep all their state on the compute device (``auto``: as many as fit the gpu budget); the
other blocks stream, with the wire copy and gradient in the pinned pool, and the fp32 master and
Adam's m and v in host RAM, except for the last ``spill_blocks`` streamed blocks, whose m and v
(and with ``master: nvme`` their master) live on the nvme or cxl tier. ``optimizer_state:
auto`` spills the fewest blocks that fit the host budget. A tier over its budget becomes a
problem that names the need, the budget and the smallest changes that would fit.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from offload.config import Config, Tier
from offload.plan.activations import choice_room, count_block, plan_rates, recompute_choice
from offload.plan.measure import Rates
from offload.plan.plan import Plan
from offload.plan.recompute import Choice, keep_margin
from offload.plan.shape import ModelShape, model_shape
from offload.plan.spill import Needs, choose_spill, fits_all, spill_fixes
from offload.plan.tally import Settings, Tally, tally
from offload.utils.sizes import format_bytes

_ITEM = {"bfloat16": 2, "float16": 2, "float32": 4}

DEVICE_MARGIN_BYTES = 2 << 30
"""Device memory ``device_blocks: auto`` keeps free beyond the plan's gpu column: the CUDA context
and the caching allocator's fragmentation (docs/plan.md, Limits)."""


def make_plan(
    model: nn.Module,
    cfg: Config,
    *,
    batch_size: int,
    seq_len: int,
    world_size: int = 1,
    local_ranks: int | None = None,
    grad_accum: int = 1,
    blocks: str | None = None,
    detect: bool = False,
    rates: Rates | None = None,
    snapshot: float = 0.0,
    loss_chunk: int | None = None,
) -> Plan:
    """The placement plan of model (meta device is enough) under cfg.

    world_size: ranks of the job; each holds a 1/world_size shard of every streamed block (the
    residents and device blocks are replicated). local_ranks: ranks on this host (default: all of
    them), whose host, cxl and nvme needs add up; the gpu need is per device. detect: budgets left
    None are read from the machine (host RAM, free space under nvme_dirs, the CUDA device's
    memory); without it None is unbounded. rates: the host link's and the matmul's, for the
    recompute-or-offload choice of placement.offload_saved; None: measured when detecting on a
    CUDA machine, else assumed. snapshot: the snapshot keeper's host memory as a multiple of the
    rank's master, m and v (offload.snapshot.config.memory_factor; 0: none). loss_chunk:
    train.loss_chunk (tokens per chunk of the chunked loss; None: the model's own loss).
    """
    local = world_size if local_ranks is None else local_ranks
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("world_size", world_size),
        ("local_ranks", local),
    ):
        if value < 1:
            raise ValueError(f"{name} = {value}: must be >= 1")
    if local > world_size:
        raise ValueError(f"local_ranks = {local}: more than world_size = {world_size}")
    shape = model_shape(model, blocks)
    budgets = _budgets(cfg, detect)
    on_cpu = cfg.resolve_device() == "cpu"
    notes: list[str] = []
    base = Settings(
        item=_ITEM[cfg.dtype],
        slots=cfg.slots,
        device_blocks=0,
        device_residents=cfg.placement.device_residents,
        world=world_size,
        optimizer=Tier.HOST,
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum=grad_accum,
        activations=Tier.GPU,
        snapshot=snapshot,
        loss_chunk=loss_chunk,
        sums_on_device=cfg.placement.gradients is Tier.GPU,  # auto: _device_sums
    )
    need = _needs(shape, local, on_cpu)
    base = base.but(activations=_activations_tier(cfg, base, need, budgets, notes))
    settings = _device_blocks(shape, cfg, base, need, budgets[Tier.GPU], notes)
    recompute = None
    if cfg.placement.offload_saved != "never":
        settings, recompute = _recompute(
            model, shape, cfg, settings, need, budgets, rates, detect, blocks, notes
        )
    settings = _device_sums(cfg, settings, need, budgets[Tier.GPU], on_cpu, notes)
    settings = choose_spill(shape, cfg, settings, need, budgets[Tier.HOST], notes, budgets[Tier.CXL])
    placement = _placement(cfg, shape, settings, notes)
    if on_cpu:
        notes.append(
            "the compute device is the CPU: the gpu column lives in host RAM and counts there "
            "(and against budgets.gpu_bytes, when given)"
        )
    if shape.hidden_size is None:
        notes.append("the model's config has no hidden_size: activations are not counted")
    t = tally(shape, settings)
    needed = need(settings)
    problems = [
        _problem(tier, needed[tier], budget, _fixes(tier, shape, settings, cfg, need, budgets))
        for tier, budget in budgets.items()
        if budget is not None and needed[tier] > budget
    ]
    return Plan(
        shape=shape,
        dtype=cfg.dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum=grad_accum,
        world_size=world_size,
        local_ranks=local,
        placement=placement,
        device_blocks=settings.device_blocks,
        residents_on_device=bool(shape.resident_numel) and settings.residents_on_device,
        spill_blocks=len(settings.spilled(shape.blocks)),
        bytes=dict(t.bytes),
        pinned_bytes=t.pinned,
        needed=needed,
        budgets=budgets,
        problems=tuple(problems),
        notes=tuple(notes),
        recompute=recompute,
        config=cfg,
    )


def _needs(shape: ModelShape, local_ranks: int, on_cpu: bool) -> Needs:
    """A function from settings to the predicted peak of each tier (this host's ranks together)."""

    def need(s: Settings) -> dict[Tier, int]:
        t: Tally = tally(shape, s)
        gpu = t.column(Tier.GPU)
        host = t.column(Tier.HOST) + (t.pinned - t.pooled) + (gpu if on_cpu else 0)
        return {
            Tier.GPU: gpu,  # on the CPU it is host RAM too: checked against a gpu budget if one is given
            Tier.HOST: local_ranks * host,
            Tier.CXL: local_ranks * t.column(Tier.CXL),
            Tier.NVME: local_ranks * t.column(Tier.NVME),
        }

    return need


def _device_blocks(
    shape: ModelShape, cfg: Config, s: Settings, need: Needs, budget: int | None, notes: list[str]
) -> Settings:
    """placement.device_blocks resolved: the number given (at most the blocks there are), or for
    auto the most blocks whose gpu need fits the gpu budget less DEVICE_MARGIN_BYTES, residents on the
    device (unless device_residents is false, or they do not fit even with no block)."""
    asked = cfg.placement.device_blocks
    if asked != "auto":
        return s.but(device_blocks=min(asked, shape.blocks))
    residents = cfg.placement.device_residents
    if budget is None:
        notes.append("device_blocks auto: every block (no gpu budget to fit)")
        return s.but(device_blocks=shape.blocks, device_residents=residents is not False)
    room = budget - DEVICE_MARGIN_BYTES
    for res in [True, False] if residents is None else [residents]:
        for k in range(shape.blocks, -1, -1):
            if need(s.but(device_blocks=k, device_residents=res))[Tier.GPU] <= room:
                notes.append(
                    f"device_blocks auto: {k} (the most that fit the gpu budget less a margin of "
                    f"{format_bytes(budget - room)}; residents {'on the device' if res else 'on the host'})"
                )
                return s.but(device_blocks=k, device_residents=res)
    notes.append("device_blocks auto: 0 (not even the streaming buffers fit the gpu budget less its margin)")
    return s.but(device_blocks=0, device_residents=False if residents is None else residents)


def _device_sums(
    cfg: Config, s: Settings, need: Needs, budget: int | None, on_cpu: bool, notes: list[str]
) -> Settings:
    """Where accumulated gradient sums go, after the device blocks have taken their room and before
    the host's budget is fitted: gpu (Settings.sums_on_device) when asked for, or for gradients
    auto when micro-batches are accumulated and the sums fit on the device beside the rest (the
    gpu budget less DEVICE_MARGIN_BYTES, as device_blocks auto counts). With gradients host and
    room for them, a note says so. Elsewhere (auto without the room, or on the CPU) auto goes on
    to choose_spill: host, or cxl for the spilled blocks."""
    asked = cfg.placement.gradients
    if asked not in (Tier.AUTO, Tier.HOST) or on_cpu or budget is None or s.grad_accum < 2:
        return s
    before, after = need(s)[Tier.GPU], need(s.but(sums_on_device=True))[Tier.GPU]
    if after > budget - DEVICE_MARGIN_BYTES:
        return s
    took = format_bytes(after - before)
    if asked is Tier.AUTO:
        notes.append(
            f"gradients auto: gpu (the sums over {s.grad_accum} micro-batches fit on the device, {took}): "
            "each gradient is added into its sum there instead of copied to host and folded"
        )
        return s.but(sums_on_device=True)
    notes.append(
        f"gradients gpu would fit ({took} more of device): each "
        "micro-batch's gradient would be added into its fp32 sum on the device instead of "
        "copied to host and folded there, leaving host memory bandwidth to the optimizer and "
        "checkpoints (docs/config.md)"
    )
    return s


def _placement(cfg: Config, shape: ModelShape, s: Settings, notes: list[str]) -> dict[str, Tier]:
    """The tier of each kind of the spilled blocks' state (host when nothing spills); gradients
    names where their gradient sums are: gpu for every streamed block's with sums_on_device, else
    the spilled blocks' (the gradients themselves always land in host RAM)."""
    spilled = bool(s.spilled(shape.blocks))
    if cfg.placement.master is Tier.GPU:
        notes.append("master gpu is not built: the runtime keeps it on host")
    sums = Tier.GPU if s.sums_on_device else s.grad_sums if spilled else Tier.HOST
    return {
        "master": s.master if spilled else Tier.HOST,
        "gradients": sums,
        "optimizer_state": s.optimizer if spilled else Tier.HOST,
        "activations": s.activations,
    }


def _activations_tier(
    cfg: Config, s: Settings, need: Needs, budgets: dict[Tier, int | None], notes: list[str]
) -> Tier:
    """placement.activations resolved. auto: gpu when the boundary states fit the gpu budget
    beside everything else (device blocks as asked, none for auto: those fill what is left),
    else host when the host budget holds them, else nvme when nvme_dirs are named; gpu, with the
    problem reported, when none fits."""
    asked = cfg.placement.activations
    if asked in (Tier.GPU, Tier.HOST, Tier.NVME):
        return asked
    if asked is not Tier.AUTO:
        notes.append(f"activations {asked} is not built: use gpu, host or nvme")
        return Tier.GPU
    blocks = cfg.placement.device_blocks
    t = s.but(device_blocks=0 if blocks == "auto" else blocks)
    tiers = [Tier.GPU, Tier.HOST] + ([Tier.NVME] if cfg.nvme_dirs else [])
    for tier in tiers:
        if fits_all(need(t.but(activations=tier)), budgets):
            why = {
                Tier.GPU: "they fit the gpu budget",
                Tier.HOST: "they do not fit the gpu budget; the device holds a window of them",
                Tier.NVME: "they fit neither the gpu nor the host budget",
            }[tier]
            notes.append(f"activations auto: {tier} ({why})")
            return tier
    notes.append(f"activations auto: gpu (no tier of {', '.join(map(str, tiers))} fits with them)")
    return Tier.GPU


def _recompute(
    model: nn.Module,
    shape: ModelShape,
    cfg: Config,
    s: Settings,
    need: Needs,
    budgets: dict[Tier, int | None],
    rates: Rates | None,
    detect: bool,
    blocks: str | None,
    notes: list[str],
) -> tuple[Settings, Choice | None]:
    """placement.offload_saved's choice on this model, from what one block keeps (counted on the
    meta device), the rates, the room the plan leaves on the gpu and the host, and the step's
    other link traffic and CPU work (docs/activations.md); None, with a note, when the block
    cannot be counted. Returns the settings with the choice's bytes.

    With device_blocks and offload_saved both auto, fewer device blocks are weighed too: they
    free the device for attention and graphs kept instead of recomputed, and cost link and CPU
    time, so the plan takes the count with the fastest estimated step (that fits the budgets)."""
    if rates is None:
        rates = plan_rates(cfg, detect, notes, s.activations)
    try:
        counted = count_block(model, cfg.dtype, s.batch_size, s.seq_len, blocks)
    except ValueError as e:
        notes.append(f"offload_saved: the saved tensors could not be counted ({e}); every block recomputes")
        return s, None
    # The runtime's margin (8% of the device, at least 2 GiB), so the plan predicts what
    # offload_saved: auto chooses there; placing device blocks needs only DEVICE_MARGIN_BYTES.
    margin = keep_margin(budgets[Tier.GPU] or 0)

    def choose_for(t: Settings) -> tuple[Settings, Choice]:
        room = choice_room(shape, t, need(t), budgets, rates, margin)
        choice, _ = recompute_choice(
            model,
            shape,
            cfg,
            batch_size=t.batch_size,
            seq_len=t.seq_len,
            room=room,
            rates=rates,
            counted=counted,
        )
        kept = t.but(
            saved_bytes=choice.offloaded_bytes,
            saved_device_bytes=choice.device_bytes,
            extra_leases=choice.extra_leases,
        )
        return kept, choice

    best, choice = choose_for(s)
    p = cfg.placement
    if p.device_blocks == "auto" and p.offload_saved == "auto" and budgets[Tier.GPU] is not None:
        for k in range(s.device_blocks - 1, -1, -1):
            alt, c = choose_for(s.but(device_blocks=k))
            if c.step_s < choice.step_s and fits_all(need(alt), budgets):
                best, choice = alt, c
        if best.device_blocks != s.device_blocks:
            notes.append(
                f"device_blocks auto: {best.device_blocks} rather than {s.device_blocks}: the device "
                f"memory they free keeps more than it recomputes (est. step {choice.step_s:.3f} s)"
            )
    notes.append(
        f"offload_saved: one block saves {format_bytes(counted.saved)} for this batch"
        + (f", its attention output {format_bytes(counted.attention)}" if counted.attention else "")
    )
    return best, choice


def _budgets(cfg: Config, detect: bool) -> dict[Tier, int | None]:
    b = cfg.budgets
    out: dict[Tier, int | None] = {
        Tier.GPU: b.gpu_bytes,
        Tier.HOST: b.host_bytes,
        Tier.CXL: b.cxl_bytes,
        Tier.NVME: b.nvme_bytes,
    }
    if not detect:
        return out
    if out[Tier.HOST] is None:
        import psutil

        out[Tier.HOST] = psutil.virtual_memory().total
    if out[Tier.NVME] is None and cfg.nvme_dirs:
        out[Tier.NVME] = _free_disk(cfg.nvme_dirs)
    if out[Tier.CXL] is None and cfg.cxl_nodes:
        out[Tier.CXL] = _cxl_memory(cfg.cxl_nodes)
    if out[Tier.GPU] is None and cfg.resolve_device().startswith("cuda"):
        import torch

        out[Tier.GPU] = torch.cuda.get_device_properties(torch.device(cfg.resolve_device())).total_memory
    return out


def _free_disk(dirs: list[str]) -> int:
    """Free bytes over the distinct filesystems of dirs (a missing dir: its nearest parent)."""
    free: dict[int, int] = {}
    for d in dirs:
        p = os.path.abspath(os.path.expanduser(d))
        while not os.path.exists(p):
            p = os.path.dirname(p)
        free[os.stat(p).st_dev] = shutil.disk_usage(p).free
    return sum(free.values())


def _cxl_memory(nodes: list[int]) -> int:
    """Memory of the distinct cxl_nodes that exist (the runtime names one that does not)."""
    from offload.memory import numa

    return sum(n.mem_total for n in numa.list_nodes() if n.id in set(nodes))


# ---- what would fit --------------------------------------------------------------------------------


def _fixes(
    tier: Tier,
    shape: ModelShape,
    s: Settings,
    cfg: Config,
    need: Needs,
    budgets: dict[Tier, int | None],
) -> list[str]:
    """Changes that would make the whole plan fit, the plainest first."""
    budget = budgets[tier]
    assert budget is not None
    fixes = [f"raise budgets.{tier}_bytes by {format_bytes(need(s)[tier] - budget)}"]
    n_dev = min(s.device_blocks, shape.blocks)
    fixes += spill_fixes(tier, shape, s, cfg, need, budgets)
    if tier is Tier.HOST and budgets[Tier.GPU] is not None:
        k = next(
            (
                k
                for k in range(n_dev + 1, shape.blocks + 1)
                if fits_all(need(s.but(device_blocks=k)), budgets)
            ),
            None,
        )
        if k is not None:
            fixes.append(f"raise placement.device_blocks to {k}")
    if tier is Tier.GPU:
        k = next(
            (k for k in range(n_dev - 1, -1, -1) if fits_all(need(s.but(device_blocks=k)), budgets)), None
        )
        if k is not None:
            fixes.append(f"lower placement.device_blocks to {k}")
        if s.slots > 2 and fits_all(need(s.but(slots=2)), budgets):
            fixes.append("lower slots to 2")
        b = next(
            (b for b in range(s.batch_size - 1, 0, -1) if fits_all(need(s.but(batch_size=b)), budgets)), None
        )
        if b is not None:
            fixes.append(f"lower train.batch_size to {b}")
    return fixes


def _problem(tier: Tier, needed: int, budget: int, fixes: list[str]) -> str:
    return (
        f"{tier}: needs {format_bytes(needed)}, budget {format_bytes(budget)} "
        f"(over by {format_bytes(needed - budget)}): " + ", or ".join(fixes)
    )


__all__ = ["make_plan"]
