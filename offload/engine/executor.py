"""The streaming executor: runs block i on the device with its weights in a slot (Horizon-LM).

Forward runs each block without autograd, keeping only its inputs (the block-boundary state).
Backward recomputes the block with autograd on the same weights, sends the weight gradients to
host on a side stream while the next (earlier) block computes, and returns the input gradients.
While block i computes, block i+1's weights (i-1's in backward) copy host-to-device into the other
slot on a side stream. Each copy first waits, on the host, for the optimizer update of that block:
the previous step's update is pipelined into this forward.

Multi-rank (offload/engine/dist.py): a streamed record holds this rank's shard; its upload copies
the shard to the device and all-gathers the block into the slot, and its gradient is
reduce-scattered (then divided by the world size) before the shard goes to host. Both
collectives run on the side stream of the copy they extend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from offload.engine.device import Device
from offload.engine.dist import Collective
from offload.engine.slots import WeightSlots
from offload.engine.trace import Tracer
from offload.store.record import BlockRecord
from offload.utils.widen import add_widened

Bindings = list[list[tuple[nn.Module, str]]]  # per ParamSlot: the (module, attribute) pairs it fills


class Executor:
    def __init__(
        self,
        device: Device,
        blocks: list[BlockRecord],
        template: nn.Module,
        bindings: Bindings,
        attr_overrides: list[list[tuple[nn.Module, str, Any]]],
        dtype: torch.dtype,
        slots: int,
        tracer: Tracer,
        check_update: Callable[[], None],
        group: Collective | None = None,
    ) -> None:
        self.device = device
        self.group = group
        self.blocks = blocks
        self.template = template
        self.bindings = bindings
        self.attr_overrides = attr_overrides
        self.tracer = tracer
        self.check_update = check_update  # raises if the optimizer's worker failed
        layout = blocks[0].layout
        # Multi-rank: flat buffers padded so every rank's shard has the same size.
        shard = None if group is None else group.shard(layout.numel)
        padded = layout.numel if shard is None else shard.padded
        self.slots = WeightSlots(device, layout, dtype, slots, padded)
        # Streamed blocks take the slots in turn; blocks kept on the device use their own buffers.
        self.streamed = [r.index for r in blocks if not r.on_device]
        self.slot_of = {index: k % slots for k, index in enumerate(self.streamed)}
        self.device_views = {r.index: layout.views(r.wire) for r in blocks if r.on_device}
        # Gradient staging on the device, double-buffered so one block's copy to host overlaps
        # the next block's backward. Padding stays zero, so norms and updates never see it.
        self.staging = [torch.zeros(padded, dtype=dtype, device=device.torch) for _ in range(2)]
        self.staging_views = [layout.views(s) for s in self.staging]
        # Multi-rank: this rank's shard on the device, per slot (the all-gather's input) and per
        # staging buffer (the reduce-scatter's output).
        part = 0 if shard is None else shard.numel
        self.gather_parts = [torch.empty(part, dtype=dtype, device=device.torch) for _ in range(slots)]
        self.grad_parts = [torch.empty(part, dtype=dtype, device=device.torch) for _ in range(2)]
        self.staging_free: list[Any] = [None, None]
        self.next_staging = 0
        self._fold_pool: ThreadPoolExecutor | None = None
        # Per-block squared gradient norms computed on the device (see grad_norms_sq()).
        self.norm_sq: list[torch.Tensor | None] = [None] * len(blocks)
        # Called with each block record once its gradient copy to host is queued (the optimizer
        # uses it to start the block's update during backward).
        self.on_grad: Callable[[BlockRecord], None] | None = None
        # Requires grad so every block joins the autograd graph (see BlockFunction).
        self.grad_token = torch.empty(0, device=device.torch, requires_grad=True)
        # Times each block's compute, after its weights are in place (offload_saved auto's
        # measuring step sets it): a context factory taking (phase, block index).
        self.timer: Callable[[str, int], Any] | None = None

    # ---- weights -------------------------------------------------------------------------------

    def upload(self, index: int, wait: bool = True) -> int | None:
        """Makes sure block index's current weights are in (or on their way to) its slot; None
        for a block kept on the device, which needs no copy. wait False: while the block's
        update is still running, queues nothing and returns None instead of waiting for it."""
        rec = self.blocks[index]
        if rec.on_device:
            return None
        s = self.slot_of[index]
        if self.slots.holds[s] == (index, rec.version) and rec.updated.is_set():
            return s
        if not wait and not rec.updated.is_set():
            return None
        # Host wait: the pipelined optimizer update of this block must be finished before its
        # wire copy is read. The device keeps running the kernels already queued meanwhile.
        with self.tracer.span("wait_update", "host", block=index):
            rec.updated.wait()
        self.check_update()
        dev = self.device
        with dev.stream(dev.h2d):
            # The slot's previous block may still be computing: wait for its compute to finish.
            dev.wait(dev.h2d, self.slots.free[s])
            with self.tracer.device_span("h2d", dev.h2d, block=index):
                if self.group is None:
                    self.slots.buffers[s].copy_(rec.wire, non_blocking=True)
                else:
                    self._gather_weights(s, rec)
            self.slots.ready[s] = dev.event(dev.h2d)
        self.slots.holds[s] = (index, rec.version)
        return s

    def _gather_weights(self, s: int, rec: BlockRecord) -> None:
        """Multi-rank upload, on the h2d stream: this rank's shard to the device, then every
        rank's shard into slot s."""
        assert self.group is not None
        part = self.gather_parts[s]
        part.copy_(rec.wire, non_blocking=True)
        # The collective's stream waits for the copy above (issued on the current stream) and
        # work.wait() makes the h2d stream wait for the collective, so the ready event recorded
        # after it covers the whole block. On the CPU (gloo) wait() blocks until it is done.
        self.group.all_gather(self.slots.buffers[s], part).wait()

    def acquire(self, index: int) -> tuple[int | None, list[torch.Tensor]]:
        """Slot of block index (None if kept on the device) and the views its weights are in,
        with the compute stream ordered after their upload."""
        s = self.upload(index)
        if s is None:
            return None, self.device_views[index]
        # Compute must not read the slot before the copy into it has landed.
        self.device.wait(self.device.compute_stream(), self.slots.ready[s])
        return s, self.slots.views[s]

    def release(self, s: int | None) -> None:
        # The next upload into this slot waits for this event: the compute reading it is done.
        if s is not None:
            self.slots.free[s] = self.device.event(self.device.compute_stream())

    def prefetch(self, index: int, step: int = 1, wait: bool = True) -> None:
        """Starts the upload of the next streamed block from index on, going in direction step.
        wait False: not if that block's update is still running (see upload)."""
        while 0 <= index < len(self.blocks):
            if not self.blocks[index].on_device:
                self.upload(index, wait)
                return
            index += step

    def bind(self, tensors: list[torch.Tensor], index: int) -> None:
        for tensor, targets in zip(tensors, self.bindings):
            for module, attr in targets:
                module.__dict__[attr] = tensor
        for module, attr, value in self.attr_overrides[index]:
            setattr(module, attr, value)

    # ---- forward -------------------------------------------------------------------------------

    def compute_span(self, name: str, index: int) -> Any:
        """The tracer's span of block index's compute, with the timer's when one is set."""
        span = self.tracer.device_span(name, self.device.compute_stream(), block=index)
        if self.timer is None:
            return span
        both = contextlib.ExitStack()
        both.enter_context(span)
        both.enter_context(self.timer(name, index))
        return both

    def forward_block(self, index: int, args: tuple, kwargs: dict) -> Any:
        s, views = self.acquire(index)
        self.bind(views, index)
        with self.compute_span("forward", index):
            out = self.template(*args, **kwargs)
        self.release(s)
        self.prefetch(index + 1)
        return out

    # ---- backward ------------------------------------------------------------------------------

    def backward_block(
        self,
        index: int,
        run: Callable[[], list[Any]],
        inputs: list[torch.Tensor],
        grad_outputs: list[torch.Tensor | None],
    ) -> list[torch.Tensor | None]:
        """Recomputes block index with autograd (``run`` calls the template on the detached
        inputs and returns the output leaves, which pair with grad_outputs) and returns the
        gradients of ``inputs``; the weight gradients go to host."""
        frozen = self.blocks[index].frozen
        if not inputs and len(frozen) == len(self.blocks[index].layout.params):
            return []  # a frozen block whose input needs no gradient: nothing to compute
        s, views = self.acquire(index)
        leaves = [v.detach().requires_grad_(k not in frozen) for k, v in enumerate(views)]
        trainable = [leaf for k, leaf in enumerate(leaves) if k not in frozen]
        self.bind(leaves, index)
        with self.compute_span("recompute+backward", index):
            with torch.enable_grad():
                out = run()
            pairs = [
                (o, g)
                for o, g in zip(out, grad_outputs)
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
            ]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], trainable + inputs, [g for _, g in pairs], allow_unused=True
            )
        self.release(s)
        self.prefetch(index - 1, step=-1)
        it = iter(grads[: len(trainable)])
        self.send_grad(index, [None if k in frozen else next(it) for k in range(len(leaves))])
        return list(grads[len(trainable) :])

    def send_grad(self, index: int, grads: list[torch.Tensor | None]) -> None:
        """Copies block index's weight gradients into a staging buffer and from there to host."""
        rec = self.blocks[index]
        if rec.on_device:
            self._keep_grad(rec, grads)
            return
        dev = self.device
        if rec.grad_count >= 1 and not rec.sums_on_device:
            # Another micro-batch: the previous gradient in rec.grad must be in the fp32 sum
            # before this one's copy overwrites it.
            rec.fold_previous(lambda: dev.sync_event(rec.d2h_done))
        g = self.next_staging
        self.next_staging ^= 1
        compute = dev.compute_stream()
        # The staging buffer's previous copy to host must be done before we overwrite it.
        dev.wait(compute, self.staging_free[g])
        self._gather(self.staging_views[g], grads)
        if self.group is None:
            self._norm(index, self.staging[g])
        ready = dev.event(compute)
        with dev.stream(dev.d2h):
            # The copy to host must not start before the gradients are in the staging buffer.
            dev.wait(dev.d2h, ready)
            with self.tracer.device_span("sum" if rec.sums_on_device else "d2h", dev.d2h, block=index):
                out = self.staging[g] if self.group is None else self._reduce_grad(index, g)
                if rec.sums_on_device:
                    self._add_to_sum(rec, out)
                else:
                    rec.grad.copy_(out, non_blocking=True)
            rec.d2h_done = dev.event(dev.d2h)
        self.staging_free[g] = rec.d2h_done
        rec.grad_count += 1
        if rec.grad_count >= 2 and rec.grad_acc is not None and not rec.sums_on_device:
            # Accumulating: add this gradient into the sum as soon as it lands, on the fold
            # thread, while the training thread goes on queueing work for the device.
            rec.fold_pending = self._folder().submit(self._fold_landed, rec, rec.d2h_done)
        if self.on_grad is not None:
            self.on_grad(rec)

    def _add_to_sum(self, rec: BlockRecord, out: torch.Tensor) -> None:
        """On the d2h stream: the gradient in out (compute dtype) into rec's fp32 sum on the
        device. The first backward since zero_grad() starts the sum; later ones add in the order
        autograd accumulates .grad, widened exactly as the host's folds are, so the sum is bit for
        bit the one the host would have made."""
        if rec.dev_sum is None:
            rec.dev_sum = torch.empty(rec.numel, dtype=torch.float32, device=self.device.torch)
        if rec.grad_count == 0:
            rec.dev_sum.copy_(out)
        else:
            add_widened(rec.dev_sum, out)  # a plain add_ on CUDA; the fast one on a CPU device
        rec.sum_sent = False

    def send_sums(self, records: list[BlockRecord]) -> None:
        """optimizer.step(): the device sums of these records to their host gradients (fp32), in
        the order given, on the d2h stream after the additions. Each record's d2h_done marks its
        own copy, so its update waits for that one only (landed()); a sum sent already and not
        added to since is not sent again (its update may be reading grad)."""
        dev = self.device
        with dev.stream(dev.d2h):
            for rec in records:
                if not rec.sums_on_device or rec.grad_count == 0 or rec.sum_sent:
                    continue
                assert rec.dev_sum is not None
                with self.tracer.device_span("d2h", dev.d2h, block=rec.index):
                    rec.grad.copy_(rec.dev_sum, non_blocking=True)
                rec.d2h_done = dev.event(dev.d2h)
                rec.sum_sent = True

    def landed(self, rec: BlockRecord) -> Callable[[], None]:
        """Waits (on the host) for the copy to host rec.d2h_done marks now."""
        event = rec.d2h_done
        return lambda: self.device.sync_event(event)

    def device_sum(self, rec: BlockRecord) -> torch.Tensor:
        """rec's sum on the device, with the compute stream ordered after its additions."""
        assert rec.dev_sum is not None
        self.device.wait(self.device.compute_stream(), rec.d2h_done)
        return rec.dev_sum

    def _folder(self) -> ThreadPoolExecutor:
        """One thread: a record's folds run in order (each waits for the one before it)."""
        if self._fold_pool is None:
            self._fold_pool = ThreadPoolExecutor(1, thread_name_prefix="offload-fold")
        return self._fold_pool

    def _fold_landed(self, rec: BlockRecord, landed: Any) -> None:
        """Fold thread: once the copy into rec.grad has landed, rec.grad_acc += rec.grad."""
        self.device.sync_event(landed)
        assert rec.grad_acc is not None
        with self.tracer.span("fold", "host", block=rec.index):
            add_widened(rec.grad_acc, rec.grad)

    def close(self) -> None:
        """Waits for the folds in flight and stops the fold thread."""
        for rec in self.blocks:
            with contextlib.suppress(BaseException):
                rec.settle_fold()
        if self._fold_pool is not None:
            self._fold_pool.shutdown()
            self._fold_pool = None

    def _reduce_grad(self, index: int, g: int) -> torch.Tensor:
        """Multi-rank, on the d2h stream: the sum over ranks of this rank's shard of staging
        buffer g, divided by the world size (the mean over the global batch)."""
        assert self.group is not None
        part = self.grad_parts[g]
        # Ordered after the staging buffer's fill (the caller's event wait) and, through
        # work.wait(), before the division and the copy to host queued next on this stream.
        self.group.reduce_scatter(part, self.staging[g]).wait()
        part.div_(self.group.world)
        self._norm(index, part)  # this rank's part of the block's squared norm
        return part

    def _keep_grad(self, rec: BlockRecord, grads: list[torch.Tensor | None]) -> None:
        """A block kept on the device: its gradient goes straight into its record (multi-rank:
        averaged over the ranks, each of which holds the whole block)."""
        rec.fold_grad()  # a no-op unless a previous micro-batch's gradient is there
        self._gather(rec.layout.views(rec.grad), grads)
        if self.group is not None:
            self.group.all_reduce(rec.grad)
            rec.grad.div_(self.group.world)
        self._norm(rec.index, rec.grad)
        rec.grad_count += 1
        if self.on_grad is not None:
            self.on_grad(rec)

    @staticmethod
    def _gather(views: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Copies a block's parameter gradients into the flat buffer whose views are given
        (zeros where a parameter got none)."""
        pairs = [(v, x) for v, x in zip(views, grads) if x is not None]
        for v, x in zip(views, grads):
            if x is None:
                v.zero_()
        torch._foreach_copy_([v for v, _ in pairs], [x for _, x in pairs])

    def _norm(self, index: int, flat: torch.Tensor) -> None:
        """Block index's squared gradient norm, taken on the device (see grad_norms_sq())."""
        self.norm_sq[index] = torch.linalg.vector_norm(flat, dtype=torch.float32).square()

    def finish_backward(self) -> None:
        """Waits until every gradient copy to host has landed (called by optimizer.step()). A sum
        kept on the device is waited for by its own update instead (send_sums, landed)."""
        for rec in self.blocks:
            if not rec.sums_on_device:
                self.device.sync_event(rec.d2h_done)

    def grad_norms_sq(self, sharded: bool | None = None) -> list[torch.Tensor]:
        """Per-block squared gradient norms computed on the device, valid when every block saw
        exactly one backward since zero_grad() (otherwise norms are taken on the host).
        Multi-rank, a sharded block's is this rank's part; sharded picks those (True) or the
        replicated blocks' (False); None: all."""
        return [
            n
            for n, rec in zip(self.norm_sq, self.blocks)
            if n is not None and (sharded is None or (rec.shard is not None) == sharded)
        ]
