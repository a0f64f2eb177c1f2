"""The drop-in wrapper: ``model, optimizer = offload.wrap(model, config, **overrides)``.

The returned model is the caller's model with its block stack streamed (outputs are the model's
own); the returned optimizer is AdamW over the CPU-master store. An ordinary loop trains it:

    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from offload.config import Config, load_config
from offload.engine.device import Device
from offload.engine.dist import Collective
from offload.engine.optimizer import OffloadAdamW
from offload.engine.runtime import Runtime
from offload.model.discovery import discover
from offload.model.init import Materialize, has_meta, materializer

if TYPE_CHECKING:
    from offload.plan import Plan


class OffloadedModel(nn.Module):
    """The wrapped model: moves inputs to the compute device and calls the original model."""

    def __init__(self, module: nn.Module, runtime: Runtime, state_keys: list[str]) -> None:
        super().__init__()
        self.module = module
        self.runtime = runtime
        self.state_keys = state_keys

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dev = self.runtime.device.torch
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(dev, non_blocking=True), (args, kwargs)
        )
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return state_dict(self)


def wrap(
    model: nn.Module,
    config: Config | dict | str | Path | None = None,
    *,
    blocks: str | None = None,
    param_groups: Sequence[dict[str, Any]] | None = None,
    init: str | Materialize | None = None,
    plan: Plan | None = None,
    **overrides: Any,
) -> tuple[OffloadedModel, OffloadAdamW]:
    """Streams model's blocks through the compute device with AdamW on CPU-master weights.

    config: an offload.Config, a dict or a YAML path; overrides are Config fields (a dict merges
    into its section). blocks: the attribute path of the block ModuleList when it cannot be found
    automatically. param_groups: ``[{"params": ["*norm*", "*.bias"], "weight_decay": 0.0}, ...]``,
    fnmatch patterns on full parameter names; unmatched parameters form the default group.
    init: for a model built on the meta device (too large to build in host memory first),
    "random" initialises each block with the model's own _init_weights just before packing it
    into the store, so only one block ever exists outside the store; or a callable(module, name)
    that fills a module's own tensors (offload.model.hf.load_pretrained returns one that reads a
    local Hugging Face directory).
    plan: the placement plan to follow, ``offload.plan.make_plan(model, config, batch_size=...,
    seq_len=...)`` for this model and config; it decides the device blocks and which blocks
    spill their state (needed for ``placement.device_blocks: auto``). None: the runtime makes
    one itself, without knowing the batch shape (``model.runtime.plan``).
    """
    cfg = load_config(config, **overrides)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    device = Device(_rank_device(cfg.resolve_device()))
    stack = discover(model, blocks)
    keys = list(model.state_dict().keys())
    materialize = materializer(model, init)
    if materialize is None and has_meta(model):
        raise ValueError(
            "the model has tensors on the meta device: pass init='random' (or a callable) to wrap()"
        )
    runtime = Runtime.build(model, stack, cfg, device, param_groups, materialize, plan)
    return OffloadedModel(model, runtime, keys), OffloadAdamW(runtime)


def _rank_device(spec: str) -> str:
    """Under torchrun, "cuda" means this rank's GPU (LOCAL_RANK)."""
    if spec == "cuda" and Collective.detect() is not None:
        return f"cuda:{Collective.local_rank()}"
    return spec


def state_dict(model: OffloadedModel) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (parameters from the master store, buffers from the model),
    with the original model's keys in its order. Multi-rank it is a collective: every rank
    calls it, and every rank gets the whole dict."""
    rt = model.runtime
    rt.wait_updates()
    names: dict[int, list[tuple[str, int]]] = {}
    for name, (rec, k) in rt.names.items():
        names.setdefault(id(rec), []).append((name, k))
    params: dict[str, torch.Tensor] = {}
    for rec in rt.records():
        # A tier may hold the master (placement.master nvme): it is read in for the copy.
        tier = rt.tier_of(rec) if rec.master_on_tier else None
        master = rec.master if tier is None else tier.acquire(rec).master
        try:
            if rec.shard is not None and rt.group is not None:  # the ranks' shards put together
                master = rt.group.gather_full(master, rt.device.torch)
            for name, k in names.get(id(rec), []):
                slot = rec.layout.params[k]
                view = master[slot.offset : slot.offset + slot.numel].view(slot.shape)
                params[name] = view.to("cpu", copy=True)  # copied before release: staging is reused
        finally:
            if tier is not None:
                tier.release(rec)
    rt.wait_updates()  # what a tier wrote back is stored before the caller goes on
    buffers = dict(model.module.named_buffers())
    template = rt.executor.template
    block_buffers = dict(template.named_buffers())
    out: dict[str, torch.Tensor] = {}
    for key in model.state_keys:
        if key in params:
            out[key] = params[key]
        elif key in buffers:
            out[key] = buffers[key].detach().cpu().clone()
        else:
            inner = key[len(rt.stack_path) + 1 :].split(".", 1)[-1]
            out[key] = block_buffers[inner].detach().cpu().clone()
    return out
