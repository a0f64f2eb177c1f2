"""Keep a block's graph instead of recomputing it: its saved tensors wait on the device, or in
host memory (SSDTrain's offload instead of recompute).

By default a streamed block runs forward without autograd and is recomputed in backward, which
costs about a third of its forward-plus-backward compute again. For the blocks that keep their
graph (``Keep.DEVICE`` and ``Keep.HOST``, chosen by ``placement.offload_saved``) the forward
instead runs once *with* autograd under a ``saved_tensors_hooks`` pack hook, and backward calls
``torch.autograd.grad`` on the graph kept since forward. ``device``: the pack hook keeps every
tensor where it is (no copy; the hook is there for the weights, below). ``host``: the block's
saved tensors are gathered as one group and copied to pinned host memory on a side stream (a
:class:`HostStore`), with SSDTrain's deduplication (a storage saved twice moves once); backward
fetches the group back, one block ahead. The store lets one copy out be in flight when the next
group is put (a host wait for the one before), so host-kept groups do not pile up on the device
waiting for their copy: two are there at a time (offload.plan.recompute.SAVED_WINDOW). That
needs the pack hook to let go of them (:meth:`Packer.take`): autograd holds the hook until the
block's backward.

The weights need care. The block ran on views of a shared device slot that later blocks
overwrite, so the pack hook never copies a tensor that lives in the block's weight buffer (the
slot, or a device block's own buffer), nor one of the template's buffers: it keeps a reference.
In backward the executor's ``acquire(index)`` has put this block's weights back in that same slot
(a block always uses the same slot) before the graph runs, so the references read the right
values again. Autograd's in-place check would see the slot's version counter move; with hooks in
force it does not check, which is what this relies on.

Neither the block's inputs nor its outputs are held by the kept graph. The inputs enter through
a one-op Function (:class:`_Entry`) whose output is a new tensor the graph does not own, and the
graph is kept as :class:`~torch.autograd.graph.GradientEdge` objects, not output tensors. So
after forward the device holds the block's saved tensors (device) or only what the group being
copied out still needs (host), not the inputs or outputs besides. Random numbers
(dropout) are drawn once, in this forward, and saved with the graph: nothing is replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge, saved_tensors_hooks
from torch.utils import _pytree as pytree

from offload.engine.activations import HostKept, HostStore, KeptStore, Stored
from offload.engine.device import Device
from offload.engine.executor import Executor
from offload.engine.packing import storage_key
from offload.plan.recompute import Keep


def weight_keys(executor: Executor) -> set[int]:
    """Storages a pack hook keeps by reference: the weight slots, the device blocks' weight
    buffers, the template's buffers (none of them freed, and each holds a block's values again
    whenever that block runs)."""
    keys = {storage_key(b) for b in executor.slots.buffers}
    keys.update(storage_key(v[0]) for v in executor.device_views.values() if v)
    keys.update(storage_key(b) for b in executor.template.buffers())
    return keys


class _Entry(torch.autograd.Function):
    """Makes x (detached) a node of the block's graph that needs no leaf: its output aliases x,
    and its gradient edge is where the block's input gradient is read off."""

    @staticmethod
    def forward(ctx: Any, token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


class _Group:
    """The saved tensors of one block's graph: stored as one group, fetched once in backward
    (no store: kept on the device, nothing to fetch)."""

    __slots__ = ("store", "stored", "tensors")

    def __init__(self, store: HostStore | None) -> None:
        self.store = store
        self.stored: Stored | None = None
        self.tensors: list[torch.Tensor] | None = None

    def fetch(self) -> list[torch.Tensor]:
        if self.tensors is None:
            if self.store is None or self.stored is None:
                return []
            self.tensors = self.store.get(self.stored)
            self.stored = None
        return self.tensors

    def drop(self) -> None:
        self.tensors = None


class _Packed:
    """What the graph holds instead of a moved tensor: its group and position."""

    __slots__ = ("group", "pos")

    def __init__(self, group: _Group, pos: int) -> None:
        self.group = group
        self.pos = pos


class Packer:
    """The pack hook of one block's forward: tensors to move are gathered in ``tensors``
    (identical views once); the rest (weights, buffers, other devices, small ones) stay put.

    Autograd keeps a reference to the pack hook in every tensor it saved with it, until the
    block's backward frees the graph, and so to this object: once the block has run, the
    gathered tensors must be taken away (:meth:`take`), or every host-kept block's saved tensors
    would stay on the device until its backward however fast they were copied out."""

    def __init__(self, group: _Group, device: torch.device, keep: set[int], min_bytes: int = 0) -> None:
        self.group = group
        self.device = device
        self.keep = keep  # storage keys kept by reference
        self.min_bytes = min_bytes
        self.tensors: list[torch.Tensor] = []
        self._seen: dict[tuple, _Packed] = {}

    def take(self) -> list[torch.Tensor]:
        """The gathered tensors, no longer held here (nor the positions seen)."""
        tensors, self.tensors, self._seen = self.tensors, [], {}
        return tensors

    def pack(self, t: torch.Tensor) -> Any:
        if t.device != self.device or storage_key(t) in self.keep:
            return t
        if t.numel() * t.element_size() < self.min_bytes:
            return t
        key = (storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        packed = self._seen.get(key)
        if packed is None:
            packed = self._seen[key] = _Packed(self.group, len(self.tensors))
            self.tensors.append(t)
        return packed


def _unpack(x: Any) -> torch.Tensor:
    if isinstance(x, _Packed):
        return x.group.fetch()[x.pos]
    return x


@dataclass(slots=True, eq=False)
class Kept:
    """One block's graph, kept from forward to backward."""

    index: int
    outputs: list[GradientEdge | None]
    """Per output leaf: where its gradient enters the graph (None: no gradient)."""
    inputs: dict[int, GradientEdge]
    """Per flat input position that needs a gradient: where it is read off."""
    weights: list[torch.Tensor]
    """The trainable weight leaves (views of the slot), in slot order without the frozen."""
    group: _Group

    def take_outputs(self, leaves: list[Any]) -> list[Any]:
        """Keeps the gradient edges of the block's output leaves; returns the leaves detached,
        so the kept graph does not hold them."""
        self.outputs = [
            get_gradient_edge(o) if isinstance(o, torch.Tensor) and o.requires_grad else None for o in leaves
        ]
        return [o.detach() if isinstance(o, torch.Tensor) else o for o in leaves]


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class SavedTensors(HostKept):
    """Runs the blocks that keep their graph with autograd; their saved tensors stay on the
    device or go to host memory."""

    def __init__(self, device: Device, blocks: int, min_bytes: int = 0) -> None:
        self.device = device
        self.blocks = blocks
        self.min_bytes = min_bytes
        self._host = KeptStore(device, blocks, "saved-tensors", min_bytes)
        self.token = torch.empty(0, device=device.torch, requires_grad=True)

    def forward(
        self,
        executor: Executor,
        index: int,
        keep: Keep,
        spec: Any,
        flat: Sequence[Any],
        needs: Sequence[bool],
    ) -> tuple[Any, Kept]:
        """Block index's forward with autograd, its saved tensors kept as keep says (DEVICE or
        HOST); returns its output and the kept graph (whose outputs ``Kept.take_outputs`` fills
        in). ``needs`` says which flat inputs want a gradient."""
        frozen = executor.blocks[index].frozen
        s, views = executor.acquire(index)
        leaves = [v.detach().requires_grad_(k not in frozen) for k, v in enumerate(views)]
        executor.bind(leaves, index)
        host = keep is Keep.HOST
        group = _Group(self.store if host else None)
        packer = Packer(group, self.device.torch, weight_keys(executor), self.min_bytes)
        # Device: the hook keeps every tensor as it is; it is there so that autograd does not
        # check the weights' version counters (the slot is overwritten, then restored).
        hooks = (packer.pack, _unpack) if host else (_keep, _keep)
        inputs, edges = list(flat), {}
        with torch.enable_grad():
            for pos, x in enumerate(flat):
                if isinstance(x, torch.Tensor):
                    inputs[pos] = x = x.detach()
                    if needs[pos]:
                        inputs[pos] = x = _Entry.apply(self.token, x)
                        edges[pos] = get_gradient_edge(x)
            args, kwargs = pytree.tree_unflatten(inputs, spec)
            stream = self.device.compute_stream()
            with (
                saved_tensors_hooks(*hooks),
                executor.tracer.device_span("forward+save", stream, block=index),
            ):
                out = executor.template(*args, **kwargs)
        executor.release(s)
        executor.prefetch(index + 1)
        if host:
            group.stored = self.store.put(index, packer.take())
        trainable = [leaf for k, leaf in enumerate(leaves) if k not in frozen]
        return out, Kept(index, [], edges, trainable, group)

    def backward(
        self, executor: Executor, kept: Kept, grad_outputs: Sequence[torch.Tensor | None]
    ) -> dict[int, torch.Tensor | None]:
        """Gradients of the kept graph: weight gradients go to host (send_grad), input gradients
        are returned by flat position."""
        index = kept.index
        # The slot holds this block's weights again before the graph reads them through the
        # references the pack hook kept (and the compute stream is ordered after their upload).
        s, _ = executor.acquire(index)
        kept.group.fetch()  # host: the saved tensors back on the device, the next block's coming
        pairs = [(e, g) for e, g in zip(kept.outputs, grad_outputs) if e is not None and g is not None]
        want = list(kept.inputs)
        targets: list[Any] = [*kept.weights, *(kept.inputs[p] for p in want)]
        stream = self.device.compute_stream()
        with executor.tracer.device_span("backward", stream, block=index):
            grads: Sequence[torch.Tensor | None] = [None] * len(targets)
            if pairs and targets:
                grads = torch.autograd.grad(
                    [e for e, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
                )
        kept.group.drop()
        executor.release(s)
        executor.prefetch(index - 1, step=-1)
        frozen = executor.blocks[index].frozen
        it = iter(grads[: len(kept.weights)])
        n = len(executor.blocks[index].layout.params)
        executor.send_grad(index, [None if k in frozen else next(it) for k in range(n)])
        return dict(zip(want, grads[len(kept.weights) :]))
