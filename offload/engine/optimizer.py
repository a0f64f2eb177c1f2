"""CPU AdamW over the store's fp32 masters, pipelined into the next forward.

``step()`` waits for the gradients to land on the host, computes the clipping coefficient, then
hands the updates to a worker thread in forward order and returns (with
``optimizer.overlap_backward`` each block's update is queued as its gradient is sent, and the
worker runs the landed one the next forward needs first: engine/updater.py). Each update is torch's fused
CPU AdamW kernel over a block's flat buffers (one call per param group range), followed by the
refresh of the block's compute-dtype wire copy. Adam's m and v come from the record's StateTier
(``Runtime.tier_of``): acquired before the kernel, released after it, and prefetched by the worker
one update ahead. It subclasses torch.optim.Optimizer so torch's
LR schedulers drive it: each param group's lr, betas, eps and weight_decay are read at step().
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from offload.engine.cpu_adam import fused_adamw_
from offload.engine.runtime import Runtime
from offload.store.record import BlockRecord

Hparams = list[tuple[float, float, float, float, float]]  # per group: lr, beta1, beta2, eps, wd


class OffloadAdamW(torch.optim.Optimizer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        opt = runtime.cfg.optimizer
        defaults = {"lr": opt.lr, "betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
        self.max_grad_norm = opt.max_grad_norm
        self.overlap_backward = opt.overlap_backward
        groups: list[dict[str, Any]] = [{"params": [], **defaults}]
        for spec in runtime.group_specs:
            groups.append({"params": [], **defaults, **spec.options, "patterns": list(spec.patterns)})
        matched: set[int] = set()
        for rec in runtime.records():
            matched.update(g for g, _, _ in rec.layout.group_ranges)
            for g, start, end in rec.group_ranges():  # this rank's part, when sharded
                groups[g]["params"].append(rec.master[start:end])
        for i, group in enumerate(groups):
            if i not in matched:
                raise ValueError(
                    f"param group {i} ({group.get('patterns', 'default')}) matched no parameters"
                )
        super().__init__(groups, defaults)
        self.last_grad_norm: float | None = None
        # Leave cores to the threads that launch device work and run autograd: a starved launch
        # thread idles the GPU.
        # Under torchrun the ranks on this host share its cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if runtime.group is not None else 1
        self.threads = opt.threads or max(1, (os.cpu_count() or 2) // local - 2)
        if self.overlap_backward:
            runtime.executor.on_grad = self._on_block_grad
        runtime.updater.prefetch = self.prefetch

    def prefetch(self, rec: BlockRecord) -> None:
        """Starts bringing rec's optimizer state in: its update is queued next."""
        if rec.update_ranges:  # a record with nothing to update never acquires its state
            self.runtime.tier_of(rec).prefetch(rec)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        rt = self.runtime
        records = [rec for rec in rt.records() if not rec.queued]
        # Sums kept on the device (placement.gradients gpu) start their copies to host first, in
        # the order the updates run: each update waits for its own block's.
        rt.executor.send_sums(records)
        with rt.tracer.span("wait_grads", "host"):
            rt.executor.finish_backward()
            rt.gather_resident_grads()
        work = [(rec, rec.take_grad(rt.executor.landed(rec))) for rec in records]
        coef = self._clip_coef(work)
        hparams = self._hparams()
        for rec, grad_fn in work:
            self._schedule(rec, self._update(rec, grad_fn, coef, hparams))
        for rec in rt.records():
            rec.queued = False
        return loss

    def _on_block_grad(self, rec: BlockRecord) -> None:
        """overlap_backward: queue block rec's update as soon as its gradient is on its way."""
        if rec.grad_count > 1:
            raise RuntimeError(
                "optimizer.overlap_backward is on, so every backward() ends an optimizer step, but backward() "
                "ran again before optimizer.step(); turn overlap_backward off to accumulate gradients"
            )
        rec.queued = True
        self.runtime.executor.send_sums([rec])  # with its sum on the device: the sum is final
        event = rec.d2h_done
        update = self._update(rec, rec.take_grad(self.runtime.executor.landed(rec)), None, self._hparams())
        if rec.on_device:
            self._schedule(rec, update)
            return

        updater, device = self.runtime.updater, self.runtime.device

        def after_copy() -> bool:
            # The gradient must have landed on the host; the wait is the device's, not busy time.
            updater.idle(lambda: device.sync_event(event))
            return update()

        # The worker takes the landed gradient the next forward needs first (engine/updater.py).
        updater.submit(rec, after_copy, ready=lambda: device.event_done(event))

    def _schedule(self, rec: BlockRecord, update: Callable[[], bool]) -> None:
        """Host records go to the worker thread. A record kept on the device is updated now by
        kernels on the compute stream, which orders them after its backward and before its next
        forward: nothing to wait for on the host."""
        if not rec.on_device:
            self.runtime.updater.submit(rec, update)
        elif update():
            rec.version += 1

    def _hparams(self) -> Hparams:
        # Read now: an LR scheduler may change the groups while the update is still queued.
        return [
            (
                float(g["lr"]),
                float(g["betas"][0]),
                float(g["betas"][1]),
                float(g["eps"]),
                float(g["weight_decay"]),
            )
            for g in self.param_groups
        ]

    def _update(
        self,
        rec: BlockRecord,
        grad_fn: Callable[[], torch.Tensor] | None,
        coef: torch.Tensor | None,
        hparams: Hparams,
    ) -> Callable[[], bool]:
        one_pass = (
            not rec.on_device
            and rec.wire.dtype == torch.bfloat16
            and rec.grad.dtype == torch.bfloat16  # not an fp32 sum from the device
            and rec.wire.data_ptr() != rec.master.data_ptr()
        )
        summed = rec.grad_count > 1 or rec.folded  # decided now: zero_grad() may reset them before run()
        tier = self.runtime.tier_of(rec)

        def run() -> bool:
            if grad_fn is None or not rec.update_ranges:  # no gradient, or all frozen: torch skips these
                return False
            rec.step += 1
            # The master comes from the tier with m and v: a tier may hold it (placement.master
            # nvme), and then rec.master is only a placeholder.
            master, exp_avg, exp_avg_sq = tier.acquire(rec)
            if one_pass and not summed:
                self._one_pass(rec, master, exp_avg, exp_avg_sq, coef, hparams)
            else:
                self._torch_pass(rec, master, exp_avg, exp_avg_sq, grad_fn(), coef, hparams)
            tier.release(rec)
            return True

        return run

    def _one_pass(
        self,
        rec: BlockRecord,
        master: torch.Tensor,  # the tier's master (rec.master unless the tier holds it)
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        coef: torch.Tensor | None,
        hparams: Hparams,
    ) -> None:
        """bf16 gradient in, fp32 master/m/v updated, bf16 wire copy out: one pass over memory."""
        scale = 1.0 if coef is None else float(coef)
        for g, start, end in rec.update_ranges:
            lr, beta1, beta2, eps, wd = hparams[g]
            fused_adamw_(
                master[start:end],
                exp_avg[start:end],
                exp_avg_sq[start:end],
                rec.grad[start:end],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=wd,
                step=int(rec.step),
                grad_scale=scale,
                wire=rec.wire[start:end],
                threads=self.threads,
            )

    def _torch_pass(
        self,
        rec: BlockRecord,
        master: torch.Tensor,  # the tier's master (rec.master unless the tier holds it)
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        grad: torch.Tensor,
        coef: torch.Tensor | None,
        hparams: Hparams,
    ) -> None:
        """torch's fused kernel on fp32 gradients (bitwise what torch.optim.AdamW(fused=True) does)."""
        if coef is not None:
            grad = grad * coef.to(grad.device)
        for g, start, end in rec.update_ranges:
            lr, beta1, beta2, eps, wd = hparams[g]
            torch._fused_adamw_(
                [master[start:end]],
                [grad[start:end]],
                [exp_avg[start:end]],
                [exp_avg_sq[start:end]],
                [],
                [rec.step],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
        if rec.wire.data_ptr() != master.data_ptr():
            rec.wire.copy_(master)

    def _clip_coef(
        self, work: list[tuple[BlockRecord, Callable[[], torch.Tensor] | None]]
    ) -> torch.Tensor | None:
        """The factor torch.nn.utils.clip_grad_norm_ would scale the gradients by, or None."""
        if self.max_grad_norm is None:
            self.last_grad_norm = None
            return None
        rt = self.runtime
        if rt.group is not None:
            total = self._sharded_norm(work)
        elif rt.device.cuda and all(r.grad_count == 1 and not r.folded for r in rt.blocks):
            total = self._device_norm(work)
        else:
            total = self._host_norm(work)
        self.last_grad_norm = float(total)
        # The same fp32 arithmetic as clip_grad_norm_, so float32 runs match it bit for bit.
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _host_norm(self, work: list[tuple[BlockRecord, Callable[[], torch.Tensor] | None]]) -> torch.Tensor:
        # Per-parameter norms in the model's parameter order, then the norm of those: the order
        # clip_grad_norm_ sums in.
        norms: dict[tuple[int, int], torch.Tensor] = {}
        executor = self.runtime.executor
        for rec, grad_fn in work:
            if grad_fn is None:
                continue
            # A sum kept on the device is measured there (the same fp32 values as its host copy).
            grad = executor.device_sum(rec) if rec.sums_on_device else grad_fn()
            for k, n in enumerate(torch._foreach_norm(rec.layout.views(grad))):
                if k not in rec.frozen:  # torch's norm leaves out parameters without a gradient
                    norms[(id(rec), k)] = n.cpu()
        ordered = [norms[(id(rec), k)] for rec, k in self.runtime.param_order if (id(rec), k) in norms]
        return torch.linalg.vector_norm(torch.stack(ordered)) if ordered else torch.zeros(())

    def _device_norm(self, work: list[tuple[BlockRecord, Callable[[], torch.Tensor] | None]]) -> torch.Tensor:
        # Blocks' squared norms were taken on the device during backward; residents on the host.
        total = torch.stack(self.runtime.executor.grad_norms_sq()).sum().cpu()
        for rec, grad_fn in work:
            if grad_fn is not None and rec.index < 0:
                total = total + torch.linalg.vector_norm(grad_fn(), dtype=torch.float32).square().cpu()
        return total.sqrt()

    def _sharded_norm(
        self, work: list[tuple[BlockRecord, Callable[[], torch.Tensor] | None]]
    ) -> torch.Tensor:
        """Multi-rank: the squared norms of this rank's shards, summed over the ranks, plus those
        of the replicated records (residents, device blocks), counted once."""
        rt = self.runtime
        assert rt.group is not None
        dev = rt.device.torch
        parts = torch.zeros(2, dtype=torch.float32, device=dev)  # [sharded, replicated]
        on_device = rt.device.cuda and all(r.grad_count == 1 and not r.folded for r in rt.blocks)
        if on_device:  # the blocks' were taken on the device during backward
            for k, sharded in enumerate((True, False)):
                norms = rt.executor.grad_norms_sq(sharded=sharded)
                if norms:
                    parts[k] += torch.stack(norms).sum()
        for rec, grad_fn in work:
            if grad_fn is not None and not (on_device and rec.index >= 0):
                sq = torch.linalg.vector_norm(grad_fn(), dtype=torch.float32).square().to(dev)
                parts[0 if rec.shard is not None else 1] += sq
        rt.group.all_reduce(parts[:1])
        return parts.sum().sqrt().cpu()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for rec in self.runtime.records():
            rec.zero_grad()
        self.runtime.zero_resident_grads()

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(
            "the offload optimizer's state is saved with offload.save(model, optimizer, root)"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError(
            "the offload optimizer's state is loaded with offload.load(model, optimizer, path)"
        )
