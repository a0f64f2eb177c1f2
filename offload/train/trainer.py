"""The training job behind ``offload train RECIPE``: recipe in, trained weights and a summary out.

Builds the model on the meta device (from a local Hugging Face directory, weights streamed from
its safetensors shards; or from the recipe's architecture, initialised block by block), wraps it
with offload, runs the loop with a progress line, and writes the final weights as a Hugging Face
directory (model.safetensors + config.json) that transformers loads.

With ``train.snapshot`` set, in-memory snapshots (docs/snapshot.md) are taken too, and a run
starts from the newest one of its job the keepers hold when that is newer than what ``--resume``
finds on disk (offload/train/snapshots.py).

Checkpoints (docs/checkpoint.md) are saved asynchronously every ``train.save_every`` steps and at
the end, with the data position and the scheduler's state, so ``offload train --resume`` continues
exactly where the run stopped: a resumed run computes what the uninterrupted one would have,
bit for bit (float32 on the CPU). A checkpoint records the recipe fields that decide the numbers;
resuming under a recipe that differs in any of them is refused, naming the fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from offload.checkpoint.format import CheckpointError, read_manifest, resolve
from offload.config import config_to_dict
from offload.plan import Accounting, Figure, Plan, account, make_plan
from offload.train.data import batches
from offload.train.loss import causal_lm_loss
from offload.train.ranks import Ranks, join
from offload.train.recipe import Recipe, build_hf_config
from offload.train.schedule import make_scheduler
from offload.train.snapshots import SnapshotGone, Snapshots
from offload.train.tokenizer import load_tokenizer

Log = Callable[[str], None]


@dataclass(slots=True)
class Summary:
    steps: int
    """Steps trained by this invocation (a resumed run starts after start_step)."""
    tokens: int
    seconds: float
    tokens_per_s: float
    first_loss: float
    final_loss: float
    peak_host_GiB: float
    peak_device_GiB: float
    store_state_GiB: float
    output_dir: str
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    checkpoints: int = 0
    checkpoint_GB: float = 0.0
    checkpoint_GBps: float = 0.0
    """Bytes of all checkpoints over the writer's time for them."""
    checkpoint_stall_s: float = 0.0
    """Training time the saves may have cost (SaveStats.stall_s, summed)."""
    last_checkpoint: str | None = None
    resumed_from: str | None = None
    """Where the state of start_step came from: "checkpoint", or a snapshot's "keeper", "parity"
    or "disk" (a flushed one); None for a fresh start."""
    snapshots: int = 0
    """In-memory snapshots this invocation took (train.snapshot)."""
    plan_vs_measured: dict[str, Any] = field(default_factory=dict)
    """Per figure (pinned, host store, host peak RSS, ...): the plan's prediction and what the
    run measured, in bytes, and their ratio (``offload.plan.account``)."""
    offload_saved: dict[str, Any] | None = None
    """placement.offload_saved auto's decision (``Choice.to_json``: what each block keeps, the
    estimates, the measured step with it); None when auto is not used or has not decided."""

    def render(self) -> str:
        resumed = f" (resumed after step {self.start_step})" if self.start_step else ""
        lines = [
            f"trained {self.steps} steps{resumed}, {self.tokens:,} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_s:,.0f} tokens/s); loss {self.first_loss:.3f} -> {self.final_loss:.3f}",
            f"peak host memory {self.peak_host_GiB:.2f} GiB, peak device memory {self.peak_device_GiB:.2f} GiB, "
            f"optimizer state in the store {self.store_state_GiB:.2f} GiB",
        ]
        if self.plan_vs_measured:
            lines.append(_accounting(self.plan_vs_measured).line())
        if self.checkpoints:
            lines.append(
                f"{self.checkpoints} checkpoint(s), {self.checkpoint_GB:.3f} GB at {self.checkpoint_GBps:.2f} GB/s, "
                f"stall {self.checkpoint_stall_s:.3f} s ({100 * self.checkpoint_stall_s / self.seconds:.1f}% "
                f"of the run); last {self.last_checkpoint}"
            )
        lines.append(f"model written to {self.output_dir}")
        return "\n".join(lines)


def build_model(recipe: Recipe, vocab_size: int, eos_id: int) -> tuple[torch.nn.Module, Any]:
    """The model on the meta device and the init that gives it weights (see offload.wrap)."""
    from offload.model.hf import build_on_meta, load_pretrained

    if recipe.model.path:
        return load_pretrained(recipe.model.path)
    return build_on_meta(build_hf_config(recipe.model, vocab_size, eos_id=eos_id)), "random"


def train(
    recipe: Recipe, *, trace: str | None = None, log: Log | None = None, resume: bool | str = False
) -> Summary:
    """Runs recipe. resume: True continues from the newest checkpoint in train.checkpoint_dir, a
    path from that checkpoint (a step directory or a root). Raises CheckpointError, before
    anything is built, when there is none or it does not fit the recipe."""
    ranks = join(recipe.offload.resolve_device())
    try:
        return _train(recipe, ranks, trace=trace, log=log, resume=resume)
    finally:
        ranks.leave()


def _train(
    recipe: Recipe, ranks: Ranks, *, trace: str | None, log: Log | None, resume: bool | str
) -> Summary:
    """train() on one rank of ranks: each reads its own share of every global batch
    (train.batch_size rows each); rank 0 logs and writes the model."""
    import offload

    log = log or (_Progress().line if ranks.main else _quiet)
    t = recipe.train
    point = resume_point(recipe, resume, log, ranks.world) if resume else None
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.model.path)
    model, init = build_model(recipe, tokenizer.vocab_size, tokenizer.eos_id)
    overrides = {"trace": trace} if trace else {}
    plan = _plan(recipe, model)
    wrapped, opt = offload.wrap(model, recipe.offload, init=init, plan=plan, **overrides)
    sched = make_scheduler(opt, t.schedule, t.steps)
    stream = batches(
        recipe.data,
        tokenizer,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        seed=t.seed,
        rank=ranks.rank,
        world_size=ranks.world,
    )
    stamp = fingerprint(recipe, ranks.world)
    snaps = None
    if t.snapshot is not None:
        snaps = Snapshots(t.snapshot, recipe.name, wrapped, opt, ranks, t.checkpoint_dir)
    try:
        start, source = _start(wrapped, opt, sched, stream, point, snaps, stamp, t.steps, log)
    except BaseException:
        if snaps is not None:
            snaps.settle()  # closes its connection to the keeper, which keeps the snapshot
        raise
    device = wrapped.runtime.device
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * ranks.world
    losses: list[float] = []
    saves = _Saves(recipe, log)
    keeps = _KeepLog(wrapped.runtime.activations.measure, log)
    began = time.perf_counter()
    try:
        for step in range(start + 1, t.steps + 1):
            total = 0.0
            for _ in range(t.grad_accum):
                batch = next(stream)
                loss = causal_lm_loss(wrapped, batch, t.loss_chunk) / t.grad_accum
                loss.backward()
                total += loss.item()
            total = ranks.mean(total, device.torch)  # the loss of the global batch
            opt.step()
            opt.zero_grad()
            sched.step()
            losses.append(total)
            extra = {"data": stream.state_dict(), "recipe": stamp}
            saving = step == t.steps or (t.save_every is not None and step % t.save_every == 0)
            if saving:  # multi-rank: every rank calls save(), rank 0 writes
                if snaps is not None:
                    snaps.before_save()
                saves.start(wrapped, opt, sched, step, extra)
            saves.report_done()
            if snaps is not None:  # after the save: its capture is drained first
                snaps.after_step(step, sched, extra)
            keeps.tell()
            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - began
                log(
                    f"step {step}/{t.steps}  loss {total:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                    f"{tokens_per_step * len(losses) / elapsed:,.0f} tokens/s  host {_peak_host() / 2**30:.2f} GiB  "
                    f"device {_peak_device(device.cuda) / 2**30:.2f} GiB"
                )
    except BaseException:
        saves.settle(raise_errors=False)  # the save in flight commits before the error goes up
        if snaps is not None:
            snaps.settle()  # and so does the snapshot in flight: the next run restores it
        raise
    saves.settle()
    if snaps is not None:
        snaps.finish()
    wrapped.runtime.wait_updates()
    seconds = time.perf_counter() - began
    out = _save(wrapped, Path(t.output_dir or f"runs/{recipe.name}"), ranks.main)
    if trace:
        wrapped.runtime.tracer.write()
    trained = len(losses)
    summary = Summary(
        steps=trained,
        tokens=tokens_per_step * trained,
        seconds=seconds,
        tokens_per_s=tokens_per_step * trained / seconds,
        first_loss=losses[0],
        final_loss=losses[-1],
        peak_host_GiB=_peak_host() / 2**30,
        peak_device_GiB=_peak_device(device.cuda) / 2**30,
        store_state_GiB=sum(r.state_bytes() for r in wrapped.runtime.records()) / 2**30,
        output_dir=str(out),
        start_step=start,
        resumed_from=source,
        snapshots=0 if snaps is None else snaps.taken,
        losses=losses,
        plan_vs_measured=account(plan, wrapped.runtime).to_json(),
        offload_saved=keeps.decision(),
        **saves.figures(),
    )
    if ranks.main:
        (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    return summary


class _KeepLog:
    """Logs offload_saved auto's decision when it is made and again when its step is measured
    (measure: the runtime's MeasuredChoice, None without auto)."""

    def __init__(self, measure: Any, log: Log) -> None:
        self.measure, self.log, self.told = measure, log, ""

    def tell(self) -> None:
        d = self._decision
        if d is not None and d.describe() != self.told:
            self.told = d.describe()
            self.log(f"offload_saved auto: {self.told}")

    def decision(self) -> dict[str, Any] | None:
        d = self._decision
        return None if d is None else d.to_json()

    @property
    def _decision(self) -> Any:
        return None if self.measure is None else self.measure.decision


def _start(
    wrapped: Any,
    opt: Any,
    sched: Any,
    stream: Any,
    point: Path | None,
    snaps: Snapshots | None,
    stamp: dict[str, Any],
    steps: int,
    log: Log,
) -> tuple[int, str | None]:
    """Loads the newest state the run has: its job's snapshot (keeper, parity, or when that is lost
    the newest step on disk: flushed, or a checkpoint of train.checkpoint_dir) or the --resume
    checkpoint, whichever is at the later step (the checkpoint on a tie: it needs no keeper).
    Returns the step and where it came from (None: a fresh start)."""
    import offload

    disk = -1 if point is None else int(read_manifest(point)["step"])
    got = None
    if snaps is not None:
        try:
            got = snaps.restore(sched, stamp, steps)
        except SnapshotGone as e:
            if point is None:
                raise
            log(f"{e}; loading {point}")
    if (
        snaps is not None
        and got is not None
        and got.step is not None
        and (got.step > disk or _same(got.path, point))
    ):
        stream.load_state_dict(got.extra["data"])
        log(snaps.resuming(got))
        return got.step, "parity" if got.rebuilt else got.source
    if point is None:
        return 0, None
    if got is not None:
        log(f"the snapshot of step {got.step} is not newer than {point}: loading the checkpoint")
    extra = offload.load(wrapped, opt, point, scheduler=sched)
    stream.load_state_dict(extra["data"])
    return disk, "checkpoint"


def _same(a: Path | None, b: Path | None) -> bool:
    """a and b are one directory (the disk fallback loaded the --resume checkpoint already)."""
    return a is not None and b is not None and a.resolve() == b.resolve()


def _plan(recipe: Recipe, model: torch.nn.Module) -> Plan:
    """The placement plan the run follows (and its summary is measured against): the recipe's
    batch shape, budgets read from this machine where the recipe leaves them null."""
    from offload.engine.dist import Collective

    group = Collective.detect()
    world = 1 if group is None else group.world
    t = recipe.train
    return make_plan(
        model,
        recipe.offload,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum,
        world_size=world,
        local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        detect=True,
        loss_chunk=t.loss_chunk,
    )


def _accounting(figures: dict[str, Any]) -> Accounting:
    return Accounting(tuple(Figure(name, f["predicted"], f["measured"]) for name, f in figures.items()))


def fingerprint(recipe: Recipe, world: int = 1) -> dict[str, Any]:
    """The recipe fields a resumed run must share with the run that saved, to compute the same
    numbers (the device, the placement and the number of ranks may differ: checkpoints do not
    depend on them; the global batch, train.batch_size rows on each of world ranks, must not)."""
    t, opt = recipe.train, recipe.offload.optimizer
    model = {k: v for k, v in config_to_dict(recipe.model).items() if k != "path"}
    return {
        "model": {**model, "pretrained": recipe.model.path is not None},
        "data": {
            "format": recipe.data.format,
            "field": recipe.data.field,
            "tokenizer": recipe.data.tokenizer,
        },
        "train": {
            "global_batch_size": t.batch_size * world,
            "seq_len": t.seq_len,
            "grad_accum": t.grad_accum,
            "seed": t.seed,
            "schedule": config_to_dict(t.schedule),
        },
        "offload": {
            "dtype": recipe.offload.dtype,
            "optimizer": {
                k: config_to_dict(getattr(opt, k))
                for k in ("lr", "betas", "eps", "weight_decay", "max_grad_norm")
            },
        },
        "steps": t.steps,
    }


def resume_point(recipe: Recipe, resume: bool | str, log: Log, world: int = 1) -> Path:
    """The checkpoint to resume from, after checking that it fits recipe (CheckpointError if not)."""
    where = Path(str(recipe.train.checkpoint_dir)) if resume is True else Path(str(resume))
    try:
        path = resolve(where)
    except CheckpointError as e:
        raise CheckpointError(f"nothing to resume from: {e}") from None
    manifest = read_manifest(path)
    saved = (manifest.get("extra") or {}).get("recipe")
    if not isinstance(saved, dict) or "data" not in (manifest.get("extra") or {}):
        raise CheckpointError(
            f"{path} was not saved by offload train (no recipe or data position in it): "
            "load it with offload.load() in a script instead"
        )
    now = fingerprint(recipe, world)
    diffs = [
        f"{key}: checkpoint {a!r}, recipe {b!r}"
        for key, a, b in differences(saved, now, "")
        if key != "steps"
    ]
    if diffs:
        raise CheckpointError(f"{path} was saved by a different recipe: {'; '.join(diffs)}")
    step = int(manifest["step"])
    if step >= recipe.train.steps:
        raise CheckpointError(
            f"{path} is at step {step}, already at train.steps = {recipe.train.steps}: raise train.steps to go on"
        )
    if saved.get("steps") != recipe.train.steps:
        log(
            f"note: the run that saved {path} had train.steps = {saved.get('steps')}, this recipe "
            f"{recipe.train.steps}: the learning-rate schedule is stretched from here on"
        )
    log(f"resuming from {path} (step {step})")
    return path


def differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        return out
    return [] if a == b else [(prefix, a, b)]


class _Saves:
    """The run's asynchronous checkpoints: starts them, reports each as it completes, and adds up
    what they cost. A failed save stops the run (CheckpointError naming the step)."""

    def __init__(self, recipe: Recipe, log: Log) -> None:
        self.dir = Path(str(recipe.train.checkpoint_dir))
        self.keep_last = recipe.train.keep_last
        self.keep_every = recipe.train.keep_every
        self.prune = recipe.train.prune
        self.log = log
        self.pending: Any = None
        self.done: list[Any] = []  # SaveStats of the committed saves
        self.last: str | None = None

    def start(self, model: Any, opt: Any, sched: Any, step: int, extra: dict[str, Any]) -> None:
        import offload

        try:
            handle = offload.save(
                model,
                opt,
                self.dir,
                step=step,
                scheduler=sched,
                extra=extra,
                keep_last=self.keep_last,
                keep_every=self.keep_every,
                prune=self.prune,
            )
        except OSError as e:
            raise CheckpointError(f"cannot save the checkpoint of step {step} in {self.dir}: {e}") from e
        self.report_done()  # save() waited for the one before: report it now
        self.pending = handle

    def report_done(self, raise_errors: bool = True) -> None:
        handle = self.pending
        if handle is None or not handle.done():
            return
        self.pending = None
        try:
            handle.wait()
        except Exception as e:
            if raise_errors:
                raise CheckpointError(f"checkpoint {handle.path} failed: {e}") from e
            return
        s = handle.stats
        self.done.append(s)
        self.last = str(handle.path)
        self.log(
            f"checkpoint {handle.path.name}: {s.bytes / 1e9:.3f} GB in {s.write_s:.2f} s ({s.gbps:.2f} GB/s), "
            f"stall {s.stall_s:.3f} s"
        )

    def settle(self, raise_errors: bool = True) -> None:
        """Waits for the save in flight and reports it."""
        if self.pending is not None:
            with contextlib.suppress(Exception):  # reported (or dropped) just below
                self.pending.wait()
            self.report_done(raise_errors)

    def figures(self) -> dict[str, Any]:
        written = sum(s.bytes for s in self.done)
        busy = sum(s.write_s for s in self.done)
        return {
            "checkpoints": len(self.done),
            "checkpoint_GB": written / 1e9,
            "checkpoint_GBps": written / busy / 1e9 if busy else 0.0,
            "checkpoint_stall_s": sum(s.stall_s for s in self.done),
            "last_checkpoint": self.last,
        }


def _save(wrapped: Any, out: Path, write: bool = True) -> Path:
    """model.safetensors + config.json: a directory transformers' from_pretrained loads. Multi-rank
    every rank takes part in gathering the weights; only the one told to write writes."""
    from safetensors.torch import save_file

    import offload

    state = {k: v.contiguous() for k, v in offload.state_dict(wrapped).items()}
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    if getattr(wrapped.module.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it on load
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    wrapped.module.config.save_pretrained(str(out))
    return out


def _quiet(text: str) -> None:
    """The log of a rank other than 0."""


def _peak_host() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_device(cuda: bool) -> int:
    return torch.cuda.max_memory_allocated() if cuda else 0


class _Progress:
    """One line rewritten in place on a terminal; a line per report elsewhere (logs, CI)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def line(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            if not text.startswith("step"):
                sys.stderr.write("\n")  # checkpoints and notes stay; only the step line is rewritten
            elif "/" in text:
                done, total = text.split()[1].split("/")
                if done == total:
                    sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
