"""Recipes: one YAML file describing a training job, parsed into typed, checked dataclasses.

A recipe has a model (a local Hugging Face directory, or an architecture and its sizes), data,
training-loop settings and the runtime's :class:`~offload.config.Config` under ``offload:``. The CLI
(``offload train RECIPE.yaml --set train.steps=10``) calls :func:`load_recipe`; input paths in the
file (``model.path``, ``data.files``) are taken relative to the file, output paths relative to the
working directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from offload.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_fields,
    from_dict,
    load_yaml,
)
from offload.snapshot.config import SnapshotConfig
from offload.train.data import DataSpec
from offload.train.schedule import ScheduleSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["ModelSpec", "Recipe", "TrainSpec", "build_hf_config", "load_recipe"]

_SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """The model: exactly one of ``path`` (pretrained) or ``arch`` with sizes (from scratch)."""

    path: str | None = None
    """A local Hugging Face model directory (config.json, weights, maybe a tokenizer)."""
    arch: Literal["llama", "mistral", "qwen2", "gpt2"] | None = None
    """Architecture family of a model built from scratch with the sizes below."""
    hidden_size: int | None = None
    """Width of the residual stream (arch only; required)."""
    num_layers: int | None = None
    """Transformer blocks (arch only; required)."""
    num_heads: int | None = None
    """Attention heads (arch only; required; must divide hidden_size)."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None: num_heads (gpt2: must equal num_heads)."""
    intermediate_size: int | None = None
    """MLP width; None: 8/3 hidden rounded up to a multiple of 256 (SwiGLU families), 4 hidden (gpt2)."""
    vocab_size: int | None = None
    """Embedding rows; None: the tokenizer's vocabulary size. Must be at least that."""
    max_position_embeddings: int | None = None
    """Longest sequence the model is built for; None: train.seq_len."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (arch only)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.path is not None and self.arch is not None:
            raise ConfigError("arch", self.arch, "give only one of model.path and model.arch, not both")
        if self.path is None and self.arch is None:
            raise ConfigError(
                "arch", None, "give model.path (a pretrained directory) or model.arch (from scratch)"
            )
        sizes = (*_SIZES, "max_position_embeddings")
        for name in sizes:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, value, "must be >= 1")
        if self.path is not None:
            for name in sizes:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        name,
                        getattr(self, name),
                        "comes from the model directory's config.json with model.path",
                    )
            return
        self._check_shape()

    def _check_shape(self) -> None:
        hidden, layers, heads = self.hidden_size, self.num_layers, self.num_heads
        if hidden is None or layers is None or heads is None:
            name = "hidden_size" if hidden is None else "num_layers" if layers is None else "num_heads"
            raise ConfigError(name, None, f"required with model.arch = {self.arch!r}")
        if hidden % heads:
            raise ConfigError("num_heads", heads, f"must divide hidden_size = {hidden}")
        kv = self.num_kv_heads
        if kv is not None and self.arch == "gpt2" and kv != heads:
            raise ConfigError("num_kv_heads", kv, "gpt2 has no grouped-query attention: leave it out")
        if kv is not None and heads % kv:
            raise ConfigError("num_kv_heads", kv, f"must divide num_heads = {heads}")


@dataclass(kw_only=True, slots=True)
class TrainSpec:
    """The training loop."""

    steps: int
    """Optimizer steps to run."""
    batch_size: int
    """Sequences per micro-batch on each rank."""
    seq_len: int
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimizer step."""
    seed: int = 0
    """Seeds model initialisation and the data order."""
    log_every: int = 1
    """Print loss and throughput every this many steps."""
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    """Learning-rate warmup and decay (the peak lr is offload.optimizer.lr)."""
    output_dir: str | None = None
    """Checkpoints and logs go here; None: runs/<recipe name>."""
    save_every: int | None = None
    """Checkpoint every this many steps (and at the end); None: only at the end."""
    checkpoint_dir: str | None = None
    """Where checkpoints go (``offload train --resume`` looks here); None: <output_dir>/checkpoints."""
    keep_last: int | None = None
    """Keep the newest this many checkpoints, pruning older ones after each save; None: keep all."""
    keep_every: int | None = None
    """With keep_last: also keep every checkpoint whose step is divisible by this."""
    prune: Literal["after", "before"] = "after"
    """When keep_last drops old checkpoints. after: once the new one is committed (keep_last of them
    always committed; the disk holds keep_last + 1 while a save runs). before: the new save writes
    its files over the ones of the step it will make surplus (no unlink, discard or allocation
    while its bytes move, so it writes at the disk's overwrite speed; the disk holds keep_last,
    but only keep_last - 1 are committed while a save runs: with keep_last 1 a crash mid-save
    leaves nothing to resume). docs/checkpoint.md."""
    loss_chunk: int | None = None
    """Tokens per chunk of a chunked cross-entropy (offload/train/loss.py): the head's logits
    exist for one chunk at a time instead of the whole batch (at 128K tokens and a 32K vocabulary
    they would take 39 GiB with their fp32 upcast and gradient). None: the model's own loss."""
    snapshot: SnapshotConfig | None = None
    """In-memory snapshots (docs/snapshot.md): taken every ``every`` steps after the optimizer
    step, restored on start when the keepers hold one of the job newer than --resume's checkpoint;
    job "default" becomes the recipe's name. None (the default): no snapshots."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be >= 1")
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "must be >= 0")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ConfigError("loss_chunk", self.loss_chunk, "must be >= 1, or null for the model's own loss")
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError("save_every", self.save_every, "must be >= 1, or null for only at the end")
        if self.schedule.warmup_steps > self.steps:
            raise ConfigError(
                "schedule.warmup_steps", self.schedule.warmup_steps, f"more than steps = {self.steps}"
            )
        for name in ("output_dir", "checkpoint_dir"):
            if getattr(self, name) == "":
                raise ConfigError(name, "", "must be a directory path, or null")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError("keep_last", self.keep_last, "must be >= 1, or null to keep every checkpoint")
        if self.keep_every is not None:
            if self.keep_every < 1:
                raise ConfigError("keep_every", self.keep_every, "must be >= 1, or null")
            if self.keep_last is None:
                raise ConfigError(
                    "keep_every", self.keep_every, "needs keep_last (it spares steps from pruning)"
                )

        if self.prune not in ("after", "before"):
            raise ConfigError("prune", self.prune, "must be after or before")
        if self.prune == "before" and self.keep_last is None:
            raise ConfigError(
                "prune", self.prune, "needs keep_last (it says which step the save writes over)"
            )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(kw_only=True, slots=True)
class Recipe:
    """A training job: what to train, on what, for how long, and how to offload it."""

    name: str
    """Names the run (default: the recipe file's name without .yaml)."""
    model: ModelSpec
    """The model to train."""
    data: DataSpec
    """The training text."""
    train: TrainSpec
    """The training loop."""
    offload: Config = field(default_factory=Config)
    """The runtime's configuration (device, dtype, optimizer, placement, budgets)."""
    path: str | None = None
    """The recipe file this came from (set by load_recipe)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not _NAME.match(self.name):
            raise ConfigError(
                "name", self.name, "use letters, digits, '.', '_' and '-' (it names a directory)"
            )
        if self.train.output_dir is None:
            self.train.output_dir = f"runs/{self.name}"
        if self.train.checkpoint_dir is None:
            self.train.checkpoint_dir = f"{self.train.output_dir}/checkpoints"
        if self.model.arch is not None:
            if self.model.max_position_embeddings is None:
                self.model.max_position_embeddings = self.train.seq_len
            if self.train.seq_len > self.model.max_position_embeddings:
                raise ConfigError(
                    "train.seq_len",
                    self.train.seq_len,
                    f"longer than model.max_position_embeddings = {self.model.max_position_embeddings}",
                )


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe in the YAML file at path, with ``dotted.key=value`` overrides applied.

    Relative ``model.path`` and ``data.files`` become absolute, relative to the file's directory.
    Raises ConfigError (naming the file, the dotted field and the value) on any bad field.
    """
    path = Path(path)
    try:
        raw = apply_overrides(load_yaml(path), overrides)
        raw.setdefault("name", path.stem)
        raw["path"] = str(path.resolve())
        recipe = from_dict(Recipe, raw)
    except ConfigError as e:
        raise e.from_source(str(path)) from None
    base = path.resolve().parent
    if recipe.model.path is not None:
        recipe.model.path = str(_under(base, recipe.model.path))
    recipe.data.files = [str(_under(base, p)) for p in recipe.data.files]
    return recipe


def _under(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def build_hf_config(spec: ModelSpec, vocab_size: int, *, eos_id: int | None = None) -> PretrainedConfig:
    """The transformers config of spec's model; vocab_size and eos_id are the tokenizer's.

    For ``path``: the directory's config (local files only), with the KV cache off. For ``arch``: a
    fresh config of that family with dropout 0, the KV cache off and SDPA attention.
    """
    if spec.path is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
        config.use_cache = False
        return config
    vocab = spec.vocab_size if spec.vocab_size is not None else vocab_size
    if vocab < vocab_size:
        raise ConfigError("model.vocab_size", vocab, f"smaller than the tokenizer's {vocab_size} ids")
    hidden, layers, heads = spec.hidden_size, spec.num_layers, spec.num_heads
    if hidden is None or layers is None or heads is None:
        raise ConfigError("model.hidden_size", hidden, "model.arch needs hidden_size, num_layers, num_heads")
    common: dict[str, Any] = {
        "use_cache": False,
        "attn_implementation": "sdpa",
        "tie_word_embeddings": spec.tie_embeddings,
        # The family's own special ids belong to its tokenizer, not necessarily to the one in use.
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
    }
    positions = spec.max_position_embeddings or 2048
    if spec.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=spec.intermediate_size,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    family = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[str(spec.arch)]
    extra = {"sliding_window": None} if spec.arch == "mistral" else {}
    return family(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=spec.intermediate_size or _swiglu_width(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=spec.num_kv_heads or heads,
        max_position_embeddings=positions,
        attention_dropout=0.0,
        **common,
        **extra,
    )


def _swiglu_width(hidden: int) -> int:
    """Llama's MLP width rule: 2/3 of 4 hidden, rounded up to a multiple of 256 (4096 -> 11008)."""
    return 256 * -(-8 * hidden // (3 * 256))
