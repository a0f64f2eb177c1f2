"""What of a wrapped run a checkpoint holds, taken from and put back into the Runtime.

Parameters are addressed by their full model names, never by record or flat offset, so a
checkpoint taken with one placement (all on the host, some blocks on the device, Adam state on
NVMe) loads into another. Optimizer state and masters are read and written through the record's
StateTier (``Runtime.tier_of``): acquire gives the flat master, m and v wherever they live, release
stores them back (an NVMe tier writes them to its file).
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from offload.checkpoint.ranks import gather_json
from offload.engine.dist import Collective
from offload.engine.runtime import Runtime
from offload.model.layout import ParamSlot
from offload.store.record import BlockRecord
from offload.store.tiers import Held


@dataclass(frozen=True, slots=True)
class ParamRef:
    """One parameter of a record: its full names (tied weights have several; the first is the
    name it is saved under) and its slot in the record's flat buffers."""

    names: tuple[str, ...]
    slot: ParamSlot

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.slot.offset : self.slot.offset + self.slot.numel].view(self.slot.shape)


def runtime_of(model: Any, optimizer: Any) -> Runtime:
    """The Runtime behind an offload.wrap() pair; refuses a model and optimizer of two wraps."""
    rt = getattr(model, "runtime", None)
    if not isinstance(rt, Runtime):
        raise TypeError(f"model must be the model offload.wrap() returned, got {type(model).__name__}")
    if not _same(getattr(optimizer, "runtime", None), rt):
        raise ValueError("optimizer does not belong to model: pass the pair one offload.wrap() call returned")
    return rt


def _same(a: object, b: object) -> bool:
    return a is b  # a function of its own: an inline `is` would narrow rt's type to the optimizer's


def params_of(rt: Runtime) -> list[tuple[BlockRecord, list[ParamRef]]]:
    """Every record (forward order) with its parameters in layout order."""
    names: dict[tuple[int, int], list[str]] = {}
    for name, (rec, k) in rt.names.items():  # each slot's names in slot order: the first is canonical
        names.setdefault((id(rec), k), []).append(name)
    return [
        (rec, [ParamRef(tuple(names[(id(rec), k)]), slot) for k, slot in enumerate(rec.layout.params)])
        for rec in rt.records()
    ]


@contextlib.contextmanager
def optimizer_state(rt: Runtime, rec: BlockRecord) -> Iterator[Held]:
    """rec's flat (master, exp_avg, exp_avg_sq) wherever its tier keeps them; stored back on exit.
    Call only while no update of rec runs or can start (after ``rt.wait_updates()``, or while a
    capture fence holds rec's next update back)."""
    tier = rt.tier_of(rec)
    held = tier.acquire(rec)
    try:
        yield held
    finally:
        tier.release(rec)


def param_groups_state(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each group's options (lr, betas, eps, weight_decay, a scheduler's initial_lr, ...), no tensors."""
    out = []
    for g in optimizer.param_groups:
        out.append({k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"})
    return out


def load_param_groups(optimizer: torch.optim.Optimizer, saved: list[dict[str, Any]]) -> None:
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint has {len(saved)} optimizer param groups, this optimizer {len(optimizer.param_groups)}: "
            "wrap the model with the same param_groups"
        )
    for group, options in zip(optimizer.param_groups, saved):
        for k, v in options.items():
            group[k] = tuple(v) if k == "betas" else v


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """torch CPU (and CUDA, if it is in use) generator states as base64; Python's and NumPy's
    global generators as lists of ints."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *(s.item() if hasattr(s, "item") else s for s in np_state[2:]),
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA to save it
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def rng_entries(group: Collective | None) -> dict[str, Any]:
    """The manifest's RNG entries as of now: ``rng``, this process's states (rank 0's when
    several ranks save), and with a group ``rng_per_rank``, every rank's in rank order (on
    rank 0, the one that writes the manifest). With a group it is a collective on the writer's
    side channel: every rank calls it at the same point of save()."""
    own = rng_state()
    per_rank = None if group is None else gather_json(group, own)
    if per_rank is None:  # one process, or a rank other than 0 (whose manifest is not written)
        return {"rng": own}
    return {"rng": per_rank[0], "rng_per_rank": per_rank}


def rng_state_for(manifest: dict[str, Any], group: Collective | None) -> dict[str, Any]:
    """The RNG states this process restores from manifest: rank r's own when the checkpoint was
    saved by as many ranks as run now, else rank 0's (``rng``). Per-rank random streams have no
    exact continuation at another world size, and checkpoints saved before ``rng_per_rank``
    existed, or by one process, hold only ``rng``."""
    per_rank = manifest.get("rng_per_rank")
    rank, world = (0, 1) if group is None else (group.rank, group.world)
    if isinstance(per_rank, list) and len(per_rank) == world:
        return dict(per_rank[rank])
    return dict(manifest["rng"])


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


def model_config(model: Any) -> dict[str, Any] | None:
    """The wrapped model's Hugging Face config as plain data, or None for a model without one."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return None
    return json.loads(cfg.to_json_string(use_diff=False))
