"""Runtime: one wrapped model's store, executor, resident parameters and optimizer worker.

Resident parameters (embeddings, final norm, head) stay on the device as ordinary parameters of
the model, in one flat buffer refreshed from their record after each update; the blocks stream.
The optimizer's updates run on the Updater's thread, so the next forward only waits for the
block it is about to copy.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from offload.config import Config, ConfigError, Tier
from offload.engine import build
from offload.engine.device import Device
from offload.engine.dist import Collective
from offload.engine.executor import Executor
from offload.engine.function import BlockProxy, make_activations
from offload.engine.trace import Tracer
from offload.engine.updater import Updater
from offload.memory import PinnedPool
from offload.model.discovery import BlockStack
from offload.model.init import Materialize, materialize_outside, materialize_tree
from offload.model.layout import FlatLayout
from offload.store.record import BlockRecord
from offload.store.tiers import GradSumTier, HostTier, StateTier, make_grad_sums, make_state_tier

if TYPE_CHECKING:
    from offload.plan import Plan


class Runtime:
    def __init__(self, cfg: Config, device: Device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.tracer = Tracer(cfg.trace, device.torch)
        if self.tracer.enabled:  # the timeline is written when the process ends (or on tracer.write())
            atexit.register(self.tracer.write)
        self.blocks: list[BlockRecord] = []
        self.resident: BlockRecord | None = None
        self.resident_params: list[nn.Parameter] = []
        self.resident_flat: torch.Tensor | None = None
        self.resident_version = -1
        self.group_specs: list[build.ParamGroupSpec] = []
        self.names: dict[str, tuple[BlockRecord, int]] = {}  # full name -> (record, slot index)
        self.param_order: list[tuple[BlockRecord, int]] = []  # the model's parameters() order
        self.stack_path = ""
        self.executor: Executor
        self.pool: PinnedPool
        self.updater = Updater(self.tracer)
        # Multi-rank (torchrun): streamed blocks are sharded over the ranks (offload/engine/dist.py).
        self.group: Collective | None = None
        # The plan this runtime follows (device blocks, spilled blocks); set by build().
        self.plan: Plan
        # The spilled blocks' state lives on state_tier (placement.optimizer_state, master) and
        # their gradient sums on grad_sums (placement.gradients cxl); every other record's in
        # its own tensors (memory_tier). tier_of() decides.
        self.spilled = range(0)
        self.state_tier: StateTier = HostTier()
        self.memory_tier = HostTier()
        self.grad_sums: GradSumTier | None = None
        self.sums_on_device = False  # placement.gradients gpu (set by build())

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        stack: BlockStack,
        cfg: Config,
        device: Device,
        param_groups: Sequence[dict] | None,
        materialize: Materialize | None = None,
        plan: Plan | None = None,
    ) -> Runtime:
        rt = cls(cfg, device, cfg.torch_dtype)
        rt.group = Collective.detect()
        rt.plan = plan_for(model, stack, cfg, rt.group, plan)
        if materialize is not None:  # everything but the blocks now; each block when packed
            materialize_outside(model, materialize, stack.blocks)
        rt.group_specs = build.parse_param_groups(param_groups)
        order = [names[0] for names, _ in build.named_unique(model)]
        rt.stack_path = stack.path
        build.check_buffers(stack.blocks, stack.path)
        layout = build.block_layout(stack.blocks[0], stack.path + ".0.", rt.group_specs)
        resident = build.resident_params(model, stack)
        res_layout = FlatLayout.build(
            [(names, p, build.group_of(names[0], rt.group_specs)) for names, p in resident]
        )
        # Where each block's state lives is the plan's decision (offload/plan/planner.py).
        n_dev = rt.plan.device_blocks
        streamed = len(stack.blocks) - n_dev
        res_on_device = rt.plan.residents_on_device
        pooled_residents = [res_layout.numel] if resident and not res_on_device else []
        block_numel = layout.numel if rt.group is None else rt.group.shard(layout.numel).numel
        # placement.gradients gpu: the streamed blocks sum their gradients on the device, and
        # their host gradient is the fp32 sum's landing place.
        rt.sums_on_device = rt.plan.placement["gradients"] is Tier.GPU
        rt._make_pool([block_numel] * streamed, pooled_residents)
        rt.spilled = rt.plan.spilled
        try:
            if rt.spilled:
                where = rt.plan.placement
                rt.state_tier = make_state_tier(where["optimizer_state"], where["master"], cfg, block_numel)
                rt.grad_sums = make_grad_sums(where["gradients"], cfg)
            rt._pack(stack, layout, n_dev, materialize)
            if resident:
                rt.resident = rt._record(
                    -1, "resident", res_layout, [p for _, p in resident], "", on_device=res_on_device
                )
        except BaseException:
            rt.close_tiers()  # no files left behind by a wrap that failed
            raise
        # Registered after any Updater of an earlier model, before this one's (started on first
        # use): at exit this runtime's updates finish first, then its state files are closed.
        atexit.register(rt.close_tiers)
        rt._install(model, stack, layout, resident)
        rt.param_order = [rt.names[n] for n in order]
        return rt

    def _pack(
        self, stack: BlockStack, layout: FlatLayout, n_dev: int, materialize: Materialize | None
    ) -> None:
        for i, block in enumerate(stack.blocks):
            if materialize is not None:
                materialize_tree(block, materialize, prefix=f"{stack.path}.{i}")
            prefix = f"{stack.path}.{i}."
            tensors = [p for _, p in build.named_unique(block)]
            self.blocks.append(self._record(i, f"block.{i}", layout, tensors, prefix, on_device=i < n_dev))
            if i > 0:
                block.to("meta")  # packed: free its memory (block 0 stays: it is the template)

    def tier_of(self, rec: BlockRecord) -> StateTier:
        """Where rec's Adam state (and master, for a tier that holds it) lives: the spill tier
        for the blocks the plan spilled (the last streamed ones); the record's own tensors for
        the other streamed blocks, the residents (small, updated first) and the blocks kept on
        the device."""
        if rec.on_device or rec.index < 0 or rec.index not in self.spilled:
            return self.memory_tier
        return self.state_tier

    def _make_pool(self, blocks: list[int], residents: list[int]) -> None:
        """A pinned pool that holds exactly the store's DMA buffers: per record the wire copy
        (the master itself in fp32) and the gradient (a streamed block's in fp32 with its sum on
        the device). Each lease gets an arena of its own exact page-rounded size, so nothing is
        lost to packing leases into fixed-size arenas."""
        page = 4096
        item = torch.finfo(self.dtype).bits // 8
        grad_item = 4 if self.sums_on_device else item
        sizes = [n * size for n in blocks for size in (item, grad_item)]  # wire (or master) + grad
        sizes += [n * item for n in residents for _ in range(2)]
        # At least a page: a run whose every block and resident stays on the device streams nothing.
        capacity = max(page, sum(-(-max(s, 1) // page) * page for s in sizes))
        self.pool = PinnedPool(capacity, arena_bytes=page, pin=self.device.cuda, name="store")

    def _lease(self, numel: int, dtype: torch.dtype, purpose: str, rec_leases: list[Any]) -> torch.Tensor:
        nbytes = numel * (torch.finfo(dtype).bits // 8)
        lease = self.pool.lease(max(nbytes, 1), purpose=purpose)
        rec_leases.append(lease)
        return lease.view(dtype, (numel,))

    def _record(
        self,
        index: int,
        name: str,
        layout: FlatLayout,
        tensors: Sequence[torch.Tensor],
        prefix: str,
        on_device: bool = False,
    ) -> BlockRecord:
        for t in tensors:
            if t.is_meta:
                raise ValueError(
                    f"parameter of {name} is on the meta device: pass init='random' to offload.wrap, or load "
                    "weights with offload.model.hf.load_pretrained(path) and init=<its materialize function>"
                )
        if on_device:
            rec = self._device_record(index, name, layout, tensors)
        else:
            rec = self._host_record(index, name, layout, tensors)
            tier = self.tier_of(rec)
            tier.place(rec)
            if tier is self.state_tier:  # a spilled block: its gradient sum spills with it
                rec.grad_acc_tier = self.grad_sums
        frozen = frozenset(
            k for k, slot in enumerate(layout.params) if not tensors[slot.source].requires_grad
        )
        if frozen:
            rec.freeze(frozen)
        for k, slot in enumerate(layout.params):
            for nm in slot.names:
                self.names[prefix + nm] = (rec, k)
        return rec

    def _host_record(
        self, index: int, name: str, layout: FlatLayout, tensors: Sequence[torch.Tensor]
    ) -> BlockRecord:
        """A streamed record: fp32 master and Adam state in host memory, the wire copy and the
        gradient in pinned pool memory (they are what the device copies from and to). Multi-rank,
        a block's record holds this rank's shard; the residents' stay whole (replicated)."""
        leases: list[Any] = []
        shard = self.group.shard(layout.numel) if self.group is not None and index >= 0 else None
        n = layout.numel if shard is None else shard.numel
        if self.dtype == torch.float32:
            master = self._lease(n, torch.float32, "master+wire", leases)
            wire = master  # the compute copy is the master itself: no second copy
        else:
            master = torch.empty(n, dtype=torch.float32)
            wire = self._lease(n, self.dtype, "wire", leases)
        values = [t.detach().float() for t in tensors]
        if shard is None:
            layout.pack(values, master)
        else:  # one block at a time, whole, then this rank's part of it
            full = torch.zeros(shard.padded, dtype=torch.float32)
            layout.pack(values, full[: layout.numel])
            master.copy_(full[shard.lo : shard.hi])
        if wire is not master:
            wire.copy_(master)
        sums_on_device = self.sums_on_device and index >= 0
        grad = self._lease(n, torch.float32 if sums_on_device else self.dtype, "grad", leases)
        grad.zero_()
        return BlockRecord(
            index=index,
            name=name,
            layout=layout,
            master=master,
            exp_avg=None,  # placed by the record's StateTier
            exp_avg_sq=None,
            wire=wire,
            grad=grad,
            step=torch.zeros((), dtype=torch.float32),
            leases=leases,
            shard=None if shard is None else (shard.lo, shard.hi),
            sums_on_device=sums_on_device,
        )

    def _device_record(
        self, index: int, name: str, layout: FlatLayout, tensors: Sequence[torch.Tensor]
    ) -> BlockRecord:
        """A record whose state lives on the compute device: the block never streams, and its
        update is torch's fused AdamW on the device."""
        dev, n = self.device.torch, layout.numel
        master = torch.empty(n, dtype=torch.float32, device=dev)
        layout.pack([t.detach().to(dev, torch.float32) for t in tensors], master)
        wire = master if self.dtype == torch.float32 else master.to(self.dtype)
        return BlockRecord(
            index=index,
            name=name,
            layout=layout,
            master=master,
            exp_avg=torch.zeros(n, dtype=torch.float32, device=dev),
            exp_avg_sq=torch.zeros(n, dtype=torch.float32, device=dev),
            wire=wire,
            grad=torch.zeros(n, dtype=self.dtype, device=dev),
            step=torch.zeros((), dtype=torch.float32, device=dev),
            on_device=True,
        )

    def _install(
        self,
        model: nn.Module,
        stack: BlockStack,
        layout: FlatLayout,
        resident: list[tuple[tuple[str, ...], nn.Parameter]],
    ) -> None:
        dev = self.device.torch
        diffs = build.attr_differences(stack.blocks)
        template = stack.blocks[0]
        bindings = build.make_template(template, layout, dev)
        overrides = [[(template.get_submodule(m) if m else template, a, v) for m, a, v in d] for d in diffs]
        self.executor = Executor(
            self.device,
            self.blocks,
            template,
            bindings,
            overrides,
            self.dtype,
            self.cfg.slots,
            self.tracer,
            self.check_update,
            self.group,
        )
        need, tier = self.plan.needed[Tier.GPU], self.plan.placement["activations"]
        self.activations = make_activations(self.cfg, self.executor, self.updater, need, tier)
        proxies = [
            BlockProxy(self.executor, i, build.proxy_attrs(b), self.activations)
            for i, b in enumerate(stack.blocks)
        ]
        setattr(stack.owner, stack.attr, nn.ModuleList(proxies))
        if self.resident is not None:
            # Kept on the device, the record's wire copy is the parameters' buffer itself: its
            # update refreshes them in place, on the compute stream.
            on_device = self.resident.on_device
            self.resident_flat = (
                self.resident.wire
                if on_device
                else torch.zeros(self.resident.numel, dtype=self.dtype, device=dev)
            )
            views = self.resident.layout.views(self.resident_flat)
            self.resident_params = [resident[slot.source][1] for slot in self.resident.layout.params]
            for p, v in zip(self.resident_params, views):
                p.data = v  # the model's own parameter now lives in the resident device buffer
            owners = {
                id(m): m
                for m in model.modules()
                if any(
                    id(q) in {id(p) for p in self.resident_params}
                    for q in m._parameters.values()
                    if q is not None
                )
            }
            for m in owners.values():
                m.register_forward_pre_hook(lambda *_: self.ensure_resident())
        model.to(dev)  # buffers; parameters are already in place

    # ---- residents -----------------------------------------------------------------------------

    def ensure_resident(self) -> None:
        rec = self.resident
        if rec is None or (self.resident_version == rec.version and rec.updated.is_set()):
            return
        rec.updated.wait()  # host wait: the pipelined update of the resident record
        self.check_update()
        assert self.resident_flat is not None
        if not rec.on_device:
            # Copied on the compute stream, so the kernels that read the parameters are ordered after it.
            self.resident_flat.copy_(rec.wire, non_blocking=True)
        self.resident_version = rec.version
        # Warm the pipeline: the first streamed block's weights start copying while the prologue
        # computes, if its update is done. If not, the host does not wait for it here: the
        # device blocks before it (placement.device_blocks) are launched first, and the block
        # is uploaded once the one before it has been (the update runs meanwhile).
        self.executor.prefetch(0, wait=False)

    def gather_resident_grads(self) -> None:
        rec = self.resident
        if rec is None:
            return
        grads = [p.grad for p in self.resident_params]
        if all(g is None for g in grads):
            return
        if rec.on_device:
            staging = rec.grad.zero_()  # padding and parameters without a gradient read as zero
        else:
            staging = torch.zeros(rec.numel, dtype=self.dtype, device=self.device.torch)
        pairs = [(v, g) for v, g in zip(rec.layout.views(staging), grads) if g is not None]
        torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
        if self.group is not None:  # replicated on every rank: the mean over the global batch
            self.group.all_reduce(staging)
            staging.div_(self.group.world)
        if staging is not rec.grad:
            rec.grad.copy_(staging)  # synchronous: small, and needed before the update starts
        rec.grad_count, rec.folded = 1, False

    def zero_resident_grads(self) -> None:
        for p in self.resident_params:
            p.grad = None

    def records(self) -> list[BlockRecord]:
        """Every record in the order the next forward needs them."""
        return ([self.resident] if self.resident is not None else []) + self.blocks

    # ---- optimizer worker ----------------------------------------------------------------------

    def wait_updates(self) -> None:
        """Host wait: every queued update has run and its optimizer state is stored."""
        self.updater.wait_all()
        self.state_tier.flush()  # the worker is idle now: the last write-backs are all in flight

    def close(self) -> None:
        """Finishes the queued updates, then frees the state tiers (their files, on nvme)."""
        self.updater.close()
        self.executor.close()
        self.close_tiers()
        self.activations.close()

    def close_tiers(self) -> None:
        """Frees the spilled blocks' state tier and gradient sums (idempotent)."""
        self.state_tier.close()
        if self.grad_sums is not None:
            self.grad_sums.close()

    def stored_bytes(self, tier: Tier | None = None) -> int:
        """Bytes of the spilled blocks' state kept outside the records on tier (None: on every
        tier): files, memory bound to CXL nodes."""
        sums = 0 if self.grad_sums is None else self.grad_sums.stored_bytes(tier)
        return self.state_tier.stored_bytes(tier) + sums

    def check_update(self) -> None:
        self.updater.check()


def plan_for(
    model: nn.Module, stack: BlockStack, cfg: Config, group: Collective | None, plan: Plan | None
) -> Plan:
    """The plan a runtime follows: the one given (made for this model, config and world size),
    or one made now. A plan made here does not know the batch shape (it counts the activations
    of one token), so ``device_blocks: auto``, which must leave room for them, needs a plan.
    Raises offload.plan.PlanError when the plan does not fit its budgets."""
    from offload.plan import make_plan, model_shape
    from offload.plan.activations import ASSUMED

    world = 1 if group is None else group.world
    if plan is not None:
        _check_plan(plan, model_shape(model, stack.path), cfg, world)
        plan.check()  # refused before anything is allocated
        return plan
    p = cfg.placement
    if p.device_blocks == "auto":
        raise ConfigError(
            "placement.device_blocks",
            "auto",
            "needs the batch shape to leave room for the activations: pass offload.wrap(..., "
            "plan=offload.plan.make_plan(model, config, batch_size=B, seq_len=T))",
        )
    made = make_plan(
        model,
        cfg,
        batch_size=1,
        seq_len=1,
        world_size=world,
        local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        blocks=stack.path,
        detect=Tier.AUTO in (p.optimizer_state, p.master),  # budgets matter only to a choice
        rates=ASSUMED,  # measuring the link is for offload_saved's estimate, not needed here
    )
    made.check()  # the budgets given (or, for a choice, this machine's), for one token
    return made


def _check_plan(plan: Plan, shape: Any, cfg: Config, world: int) -> None:
    made = plan.config
    for what, theirs, ours in (
        ("model", plan.shape, shape),
        ("world size", plan.world_size, world),
        ("dtype", plan.dtype, cfg.dtype),
        ("placement", None if made is None else made.placement, cfg.placement),
        ("slots", None if made is None else made.slots, cfg.slots),
    ):
        if theirs != ours:
            raise ValueError(
                f"the plan was made for another {what} ({theirs}, here {ours}): make it with "
                "make_plan(model, config, ...) for the model and config you wrap"
            )
