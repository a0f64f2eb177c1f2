"""Typed configuration: the runtime's :class:`Config`, and the machinery every component's config uses.

Each component owns a nested ``@dataclass(kw_only=True, slots=True)`` with a docstring under each
field. Its ``__post_init__`` calls :func:`check_fields` (types, from the annotations) and then checks
ranges, raising :class:`ConfigError` with the field name and the bad value. :func:`from_dict` builds
such a dataclass from plain dicts (YAML, JSON, CLI ``--set``), so a recipe section and a keyword
override go through exactly the same checks as a Python constructor call, and nested errors name the
full dotted path (``offload.optimizer.lr``). :func:`config_to_dict` is the inverse, JSON-ready.

Importing this module loads PyYAML only; torch is imported where a dtype or device is resolved.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

from offload.utils.sizes import parse_bytes

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

__all__ = [
    "BudgetsConfig",
    "Config",
    "ConfigError",
    "OptimizerConfig",
    "PlacementConfig",
    "Tier",
    "apply_overrides",
    "check_fields",
    "coerce",
    "config_to_dict",
    "from_dict",
    "load_config",
    "load_yaml",
    "merge_dicts",
]


class ConfigError(ValueError):
    """A bad configuration value: names the dotted field path, the value and what was expected."""

    def __init__(self, field: str, value: Any, reason: str, *, source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field or '<root>'} = {_short_repr(value)}: {reason}")

    def within(self, prefix: str) -> ConfigError:
        """The same error, with its field path under the section prefix."""
        return ConfigError(_join(prefix, self.field), self.value, self.reason, source=self.source)

    def from_source(self, source: str) -> ConfigError:
        """The same error, saying which file it came from."""
        return ConfigError(self.field, self.value, self.reason, source=source)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name:
        return prefix
    return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}"


# --------------------------------------------------------------------------------------------------
# Building typed dataclasses from plain data


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """cls's resolved annotations (the modules use ``from __future__ import annotations``)."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """value as an instance of the annotated type tp, or ConfigError naming path.

    Accepts what YAML and JSON produce: a dict for a dataclass, a list for a tuple, an int for a
    float, a string for an Enum. Never converts between strings and numbers.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, args, path)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(path, value, f"expected {_type_name(tp)}")
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, origin, args, path)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, f"expected {_type_name(tp)}, got {type(value).__name__}")
        return {
            coerce(k, args[0], f"{path}[{k!r}]"): coerce(v, args[1], f"{path}[{k!r}]")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path)
        raise ConfigError(path, value, f"expected a mapping of {tp.__name__} fields")
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(path, value, f"expected {_type_name(tp)}") from None
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, tp: Any, args: tuple[Any, ...], path: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(path, value, f"expected {_type_name(tp)}")
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1:
        try:
            return coerce(value, arms[0], path)
        except ConfigError as e:
            if e.field != path:  # an error deeper inside the value: it says more than we can
                raise
            raise ConfigError(path, value, f"expected {_type_name(tp)}, got {type(value).__name__}") from None
    for arm in arms:
        try:
            return coerce(value, arm, path)
        except ConfigError:
            continue
    raise ConfigError(path, value, f"expected {_type_name(tp)}, got {type(value).__name__}")


def _coerce_sequence(value: Any, tp: Any, origin: type, args: tuple[Any, ...], path: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, value, f"expected {_type_name(tp)}, got {type(value).__name__}")
    if origin is list:
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(path, value, f"expected {_type_name(tp)} ({len(args)} items)")
    return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(path, value, f"expected {tp.__name__}, got bool")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, value, f"expected {_type_name(tp)}, got {type(value).__name__}")


def check_fields(obj: Any) -> None:
    """Checks (and normalises in place) every field of the dataclass obj against its annotation.

    Called first thing in each config's ``__post_init__``; raises ConfigError naming the field.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        setattr(obj, f.name, coerce(value, _field_types(type(obj))[f.name], f.name))


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """An instance of the dataclass cls built from data; nested dicts become nested dataclasses.

    Unknown and missing fields raise ConfigError naming the dotted path (under path) and listing the
    valid field names; errors from the dataclass's own checks are re-raised under path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(path, data, f"expected a mapping of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    valid = ", ".join(fields)
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_join(path, str(key)), value, f"unknown field; valid fields here: {valid}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigError(_join(path, name), None, "missing required field")
    try:
        return cls(**data)
    except ConfigError as e:
        raise e.within(path) from None
    except ValueError as e:  # a component that raises a plain ValueError still gets its path named
        raise ConfigError(path, dict(data), str(e)) from None


def config_to_dict(cfg: Any) -> Any:
    """cfg (a config dataclass) as plain JSON/YAML data: dicts, lists, str, numbers, None.

    ``from_dict(type(cfg), config_to_dict(cfg)) == cfg``.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Enum):
        return cfg.value
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


# --------------------------------------------------------------------------------------------------
# YAML, merging and overrides


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.2 does; PyYAML's 1.1 rules need a dot)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """text parsed as YAML (safe subset, with ``1e-3`` read as a float)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: builds plain data only


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of the YAML file path (an empty file is an empty mapping)."""
    data = parse_yaml(Path(path).read_text(encoding="utf-8"))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", data, "expected a mapping at the top of the file", source=str(path))
    return data


def merge_dicts(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: base with overrides merged in; where both hold a section, merged recursively.

    A section in base may be a mapping or a config dataclass (taken as its fields). Anything else is
    replaced, and the result is checked when a dataclass is built from it.
    """
    out = dict(base)
    for key, value in overrides.items():
        current = out.get(key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            current = config_to_dict(current)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = merge_dicts(current, value)
        else:
            out[key] = value
    return out


def apply_overrides(cfg_dict: Mapping[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """A new dict: cfg_dict with each ``dotted.key=value`` applied (the CLI's ``--set``).

    The value is parsed as YAML (``1e-3`` a float, ``[0.9, 0.95]`` a list, ``null`` None, ``64GiB`` a
    string). Missing sections are created; the fields are checked when a dataclass is built.
    """
    out = dict(cfg_dict)
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(key, item, "expected an override of the form dotted.key=value")
        try:
            value: Any = parse_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(key, text, f"value is not valid YAML ({e})") from None
        for part in reversed(key.split(".")):
            value = {part: value}
        out = merge_dicts(out, value)
    return out


# --------------------------------------------------------------------------------------------------
# The runtime's config


class Tier(str, Enum):
    """Where a kind of state lives. The one list of tier names; placement and planner use it."""

    AUTO = "auto"
    """Let the planner choose from the budgets."""
    GPU = "gpu"
    HOST = "host"
    CXL = "cxl"
    """A CPU-less NUMA node (see ``Config.cxl_nodes``)."""
    NVME = "nvme"
    """Files under ``Config.nvme_dirs``."""

    def __str__(self) -> str:
        return self.value


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW on the fp32 master weights."""

    lr: float = 1e-4
    """Peak learning rate (a schedule scales it)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's decay rates of the first and second moments."""
    eps: float = 1e-8
    """Added to the second moment's square root."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    max_grad_norm: float | None = None
    """Clip the global gradient L2 norm to this; None: no clipping."""
    overlap_backward: bool = False
    """Update each block as soon as its gradient reaches the host, while backward goes on, rather
    than at optimizer.step(). Every backward() then ends a step: no gradient accumulation, and
    no clipping (the norm is known only after the whole backward). Faster when the CPU optimizer
    takes longer than the forward pass."""
    threads: int | None = None
    """CPU threads of the optimizer's kernel; None: all cores but two (left to the threads that
    launch device work and run autograd)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.overlap_backward and self.max_grad_norm is not None:
            raise ConfigError(
                "overlap_backward",
                True,
                "needs max_grad_norm null: with clipping no block can be updated "
                "before the whole backward has given the gradient norm",
            )
        if self.lr < 0:
            raise ConfigError("lr", self.lr, "must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", self.threads, "must be >= 1, or null for all cores but two")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"betas[{i}]", beta, "must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError("eps", self.eps, "must be > 0")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm", self.max_grad_norm, "must be > 0, or null for no clipping")


@dataclass(kw_only=True, slots=True)
class PlacementConfig:
    """The tier of each kind of per-block state."""

    master: Tier = Tier.HOST
    """fp32 master weights of the spilled blocks (spill_blocks). cxl: in memory bound to the
    cxl_nodes, striped block by block. nvme: a spilled block's file holds its master with its m
    and v (needs optimizer_state nvme or auto). Both need a compute dtype other than float32,
    where the master is itself the pinned copy the device reads (DMA-hot: it stays in local
    DRAM). auto: host, unless spilling every streamed block's m and v still leaves the host over
    budget; then the spilled blocks' masters go with their m and v (cxl or nvme)."""
    optimizer_state: Tier = Tier.HOST
    """Adam's m and v of the spilled blocks: host, cxl, nvme, or auto (host when it fits
    budgets.host_bytes, else the fewest last blocks spilled that make it fit: to cxl when
    cxl_nodes are named and budgets.cxl_bytes holds them, else to nvme)."""
    spill_blocks: int | None = None
    """How many streamed blocks spill: the last ones, whose m and v go to optimizer_state, master
    to master and gradient sums to gradients (each where that is not host); the others keep all
    their state in host RAM. None: every streamed block when a tier is named (cxl, nvme), the
    fewest that fit the host budget for optimizer_state auto."""
    gradients: Tier = Tier.HOST
    """The fp32 gradient sums of the spilled blocks (made when accumulating micro-batches).
    Gradients as they come off the GPU are DMA targets and always land in pinned local DRAM.
    cxl: the sums in memory bound to the cxl_nodes. nvme is refused: a sum is read and written
    back once per micro-batch on backward's critical path. auto: host, unless m and v (and with
    master auto the masters) of every streamed block on cxl still leave the host over budget
    while micro-batches are accumulated: then the spilled blocks' sums go to cxl too. gpu:
    every streamed block's sum on the compute device, the micro-batches added there, the sum
    copied to host once a step; auto picks it first when a plan that knows grad_accum > 1 finds
    room for the sums on the device."""
    activations: Tier = Tier.GPU
    """Block-boundary hidden states kept for the backward pass: gpu keeps them on the device;
    host copies them to pinned host memory during forward and back during backward, a few
    blocks ahead, so the device holds only a window of them; nvme writes them to files under
    nvme_dirs. auto: the plan's choice, gpu when they fit the gpu budget beside the rest, else
    host, else nvme (with nvme_dirs)."""
    offload_saved: Literal["never", "auto", "always"] | list[int] | dict[str, list[int]] = "never"
    """What blocks keep for their backward instead of being recomputed (docs/activations.md):
    "never" recomputes every block; "always" keeps every block's graph with its saved tensors in
    host memory (SSDTrain's offload instead of recompute), a list those blocks' (0-based); a
    mapping names the blocks of each kind: {device: [..]} keep their graph on the device, {host:
    [..]} in host memory, {attention: [..]} keep their attention output and log-sum-exp on the
    device and recompute the rest, {attention_host: [..]} the same in host memory. "auto"
    recomputes every block for two steps, measuring the second, then keeps what the cost model
    picks (offload.plan.recompute): nothing unless that saves at least 10% of the step."""
    device_blocks: int | Literal["auto"] = 0
    """How many of the first blocks keep all their state (weights, master, Adam m and v,
    gradients) on the compute device instead of streaming: spare device memory as the fastest
    tier. Their updates run on the device during backward, so the CPU optimizer has fewer blocks
    to update and the next forward starts without waiting for it. 0: every block streams.
    "auto": the planner's choice, the most blocks that fit budgets.gpu_bytes (or the device's
    memory) less a margin, with the residents on the device (docs/plan.md)."""
    device_residents: bool | None = None
    """Whether the resident parameters (embeddings, final norm, head) keep all their state on
    the compute device too, updated there right after backward instead of by the CPU between
    backward and the next forward (where nothing else overlaps it). None: when device_blocks > 0
    or "auto" (spare device memory was offered)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.device_blocks != "auto" and self.device_blocks < 0:
            raise ConfigError("device_blocks", self.device_blocks, 'must be >= 0 or "auto"')
        if self.gradients is Tier.NVME:
            raise ConfigError(
                "gradients",
                "nvme",
                "a gradient sum on nvme would be read and written back once per micro-batch, on "
                "backward's critical path (8 bytes a parameter of disk traffic each time): use "
                "gradients cxl or host, or fewer micro-batches of a larger batch",
            )
        if self.spill_blocks is not None:
            if self.spill_blocks < 0:
                raise ConfigError("spill_blocks", self.spill_blocks, "must be >= 0, or null")
            if not self.spills():
                raise ConfigError(
                    "spill_blocks",
                    self.spill_blocks,
                    f"blocks spill to the optimizer_state tier, and it is {self.optimizer_state}: "
                    "set optimizer_state to nvme, cxl or auto (or master or gradients to cxl)",
                )
        if self.master is Tier.NVME and self.optimizer_state not in (Tier.NVME, Tier.AUTO):
            raise ConfigError(
                "master",
                "nvme",
                f"needs optimizer_state nvme or auto, not {self.optimizer_state}: a spilled "
                "block's file holds its master with its m and v (the coldest state spills first)",
            )
        _check_offload_saved(self.offload_saved)

    def spills(self) -> bool:
        """Whether any kind of a block's state may leave host RAM (spill_blocks applies)."""
        return (
            self.optimizer_state in (Tier.NVME, Tier.CXL, Tier.AUTO)
            or self.master is Tier.CXL
            or self.gradients is Tier.CXL
        )


_KEEP_KINDS = ("device", "host", "attention", "attention_host")  # offload.plan.recompute.Keep


def _check_offload_saved(value: object) -> None:
    """Block lists of placement.offload_saved: indices >= 0, each block listed once, known kinds."""
    if isinstance(value, str):
        return
    kinds = {"": value} if isinstance(value, list) else value
    assert isinstance(kinds, dict)
    seen: dict[int, str] = {}
    for kind, blocks in kinds.items():
        name = "offload_saved" + (f".{kind}" if kind else "")
        if kind and kind not in _KEEP_KINDS:
            raise ConfigError(name, blocks, f"unknown kind; expected one of {', '.join(_KEEP_KINDS)}")
        for i, block in enumerate(blocks):
            if block < 0:
                raise ConfigError(f"{name}[{i}]", block, "must be a block index >= 0")
            if block in seen:
                where = f" (also under {seen[block]})" if seen[block] != name else ""
                raise ConfigError(f"{name}[{i}]", block, f"is listed twice{where}")
            seen[block] = name


@dataclass(kw_only=True, slots=True)
class BudgetsConfig:
    """Bytes the planner may use on each tier; None: what the machine has. Strings like "64GiB" work."""

    gpu_bytes: int | None = None
    """GPU memory."""
    host_bytes: int | None = None
    """Host RAM (pinned and pageable together)."""
    cxl_bytes: int | None = None
    """CXL memory, over all of ``Config.cxl_nodes``."""
    nvme_bytes: int | None = None
    """Disk space, over all of ``Config.nvme_dirs``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                try:
                    setattr(self, f.name, parse_bytes(value))
                except ValueError as e:
                    raise ConfigError(f.name, value, str(e)) from None
        check_fields(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise ConfigError(f.name, value, "must not be negative")


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")


@dataclass(kw_only=True, slots=True)
class Config:
    """Everything ``offload.wrap(model, config, **overrides)`` needs besides the model."""

    device: str = "auto"
    """Compute device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Compute dtype, and the dtype weights travel in (the master copy is always fp32)."""
    slots: int = 2
    """GPU weight slots: one computes while the others are filled (at least 2)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer that runs on the master weights."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Which tier holds each kind of state."""
    nvme_dirs: list[str] = field(default_factory=list)
    """Directories for NVMe-tier files (one per drive; O_DIRECT-capable filesystems)."""
    cxl_nodes: list[int] = field(default_factory=list)
    """NUMA node ids of CXL memory."""
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    """Byte budgets per tier, for the planner."""
    trace: str | None = None
    """Write a Chrome-trace JSON of copies and compute to this path; None: no trace."""
    seed: int | None = None
    """Seed torch's generators on wrap; None: leave them alone."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not _DEVICE.match(self.device):
            raise ConfigError("device", self.device, 'expected "auto", "cpu", "cuda" or "cuda:N"')
        if self.slots < 2:
            raise ConfigError("slots", self.slots, "must be >= 2 (one computes while another fills)")
        for i, node in enumerate(self.cxl_nodes):
            if node < 0:
                raise ConfigError(f"cxl_nodes[{i}]", node, "must be a NUMA node id >= 0")
        for i, d in enumerate(self.nvme_dirs):
            if not d:
                raise ConfigError(f"nvme_dirs[{i}]", d, "must be a directory path")
        master = self.placement.master
        if master in (Tier.NVME, Tier.CXL) and self.dtype == "float32":
            raise ConfigError(
                "placement.master",
                str(master),
                "in float32 the master is itself the pinned copy the device reads, so it stays in "
                "host RAM: use dtype bfloat16 or float16, or master host",
            )
        p = self.placement
        if p.optimizer_state is Tier.AUTO and p.spill_blocks and not self.nvme_dirs:
            raise ConfigError(
                "placement.spill_blocks",
                p.spill_blocks,
                "optimizer_state auto spills to the nvme tier: name nvme_dirs",
            )
        if self._fields_on(Tier.NVME) and not self.nvme_dirs:
            raise ConfigError(
                "nvme_dirs",
                self.nvme_dirs,
                f"placement uses the nvme tier ({', '.join(self._fields_on(Tier.NVME))}): name a directory",
            )
        if self._fields_on(Tier.CXL) and not self.cxl_nodes:
            raise ConfigError(
                "cxl_nodes",
                self.cxl_nodes,
                f"placement uses the cxl tier ({', '.join(self._fields_on(Tier.CXL))}): name a NUMA "
                "node of CXL memory (offload doctor lists them)",
            )

    def _fields_on(self, tier: Tier) -> list[str]:
        """The placement fields set to tier, dotted (placement.master, ...)."""
        p = self.placement
        kinds = {"master": p.master, "optimizer_state": p.optimizer_state, "gradients": p.gradients}
        kinds["activations"] = p.activations
        return [f"placement.{k}" for k, t in kinds.items() if t is tier]

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch.dtype."""
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[self.dtype]

    def resolve_device(self) -> str:
        """``device`` with "auto" made concrete: "cuda" when CUDA is available, else "cpu"."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(config: Config | Mapping[str, Any] | str | Path | None = None, **overrides: Any) -> Config:
    """A checked Config from config (None, a Config, a dict, or a YAML file's path) and overrides.

    Overrides are fields of Config; a dict value merges into the section it names, so
    ``load_config(optimizer={"lr": 1e-3})`` changes only the learning rate.
    """
    source: str | None = None
    if config is None:
        base: Mapping[str, Any] = {}
    elif isinstance(config, Config):
        base = config_to_dict(config)
    elif isinstance(config, (str, Path)):
        source = str(config)
        base = load_yaml(config)
    elif isinstance(config, Mapping):
        base = config
    else:
        raise ConfigError("config", config, "expected None, a Config, a dict or a YAML file path")
    try:
        return from_dict(Config, merge_dicts(base, overrides))
    except ConfigError as e:
        raise e.from_source(source) if source else e from None
