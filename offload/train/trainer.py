"""The training job behind ``offload train RECIPE``: recipe in, trained weights and a summary out.

Builds the model on the meta device (from a local Hugging Face directory, weights streamed from
its safetensors shards; or from the recipe's architecture, initialised block by block), wraps it
with offload, runs the loop with a progress line, and writes the final weights as a Hugging Face
directory (model.safetensors + config.json) that transformers loads.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from offload.train.data import batches
from offload.train.recipe import Recipe, build_hf_config
from offload.train.schedule import make_scheduler
from offload.train.tokenizer import load_tokenizer


@dataclass(slots=True)
class Summary:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    first_loss: float
    final_loss: float
    peak_host_GiB: float
    peak_device_GiB: float
    store_state_GiB: float
    output_dir: str

    def render(self) -> str:
        return (
            f"trained {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_s:,.0f} tokens/s); loss {self.first_loss:.3f} -> {self.final_loss:.3f}\n"
            f"peak host memory {self.peak_host_GiB:.2f} GiB, peak device memory {self.peak_device_GiB:.2f} GiB, "
            f"optimizer state in the store {self.store_state_GiB:.2f} GiB\n"
            f"model written to {self.output_dir}"
        )


def build_model(recipe: Recipe, vocab_size: int, eos_id: int) -> tuple[torch.nn.Module, Any]:
    """The model on the meta device and the init that gives it weights (see offload.wrap)."""
    from offload.model.hf import build_on_meta, load_pretrained

    if recipe.model.path:
        return load_pretrained(recipe.model.path)
    return build_on_meta(build_hf_config(recipe.model, vocab_size, eos_id=eos_id)), "random"


def train(recipe: Recipe, *, trace: str | None = None, log: Callable[[str], None] | None = None) -> Summary:
    import offload

    log = log or _Progress().line
    t = recipe.train
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.model.path)
    model, init = build_model(recipe, tokenizer.vocab_size, tokenizer.eos_id)
    overrides = {"trace": trace} if trace else {}
    wrapped, opt = offload.wrap(model, recipe.offload, init=init, **overrides)
    sched = make_scheduler(opt, t.schedule, t.steps)
    stream = batches(recipe.data, tokenizer, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)
    device = wrapped.runtime.device
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        total = 0.0
        for _ in range(t.grad_accum):
            batch = next(stream)
            loss = wrapped(**batch).loss / t.grad_accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total)
        if step % t.log_every == 0 or step == t.steps:
            elapsed = time.perf_counter() - start
            log(
                f"step {step}/{t.steps}  loss {total:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{tokens_per_step * step / elapsed:,.0f} tokens/s  host {_peak_host() / 2**30:.2f} GiB  "
                f"device {_peak_device(device.cuda) / 2**30:.2f} GiB"
            )
    wrapped.runtime.wait_updates()
    seconds = time.perf_counter() - start
    out = _save(wrapped, Path(t.output_dir or f"runs/{recipe.name}"))
    if trace:
        wrapped.runtime.tracer.write()
    summary = Summary(
        steps=t.steps,
        tokens=tokens_per_step * t.steps,
        seconds=seconds,
        tokens_per_s=tokens_per_step * t.steps / seconds,
        first_loss=losses[0],
        final_loss=losses[-1],
        peak_host_GiB=_peak_host() / 2**30,
        peak_device_GiB=_peak_device(device.cuda) / 2**30,
        store_state_GiB=sum(r.state_bytes() for r in wrapped.runtime.records()) / 2**30,
        output_dir=str(out),
    )
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    return summary


def _save(wrapped: Any, out: Path) -> Path:
    """model.safetensors + config.json: a directory transformers' from_pretrained loads."""
    from safetensors.torch import save_file

    import offload

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in offload.state_dict(wrapped).items()}
    if getattr(wrapped.module.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it on load
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    wrapped.module.config.save_pretrained(str(out))
    return out


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
            if text.startswith("step") and "/" in text:
                done, total = text.split()[1].split("/")
                if done == total:
                    sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
