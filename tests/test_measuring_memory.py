"""offload_saved auto's measuring pass must not hold more memory than a recomputing pass: the
runtime sizes its room for keeps from that pass's peak (offload.engine.choice.device_room), so
memory the measuring itself held would be taken from the keeps."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import offload


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by the storages that ops create, freed as they die."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.total = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.total += storage.nbytes()
            self.peak = max(self.peak, self.total)
            weakref.finalize(storage, self._gone, key)
        return out

    def _gone(self, key: int) -> None:
        self.total -= self.live.pop(key)


def step_peaks(offload_saved: str, steps: int = 3) -> list[int]:
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=1024,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model, opt = offload.wrap(
        LlamaForCausalLM(cfg), device="cpu", dtype="float32", placement={"offload_saved": offload_saved}
    )
    ids = torch.randint(0, 128, (1, 1024))
    peaks = []
    for _ in range(steps):
        live = LiveBytes()
        with live:
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        peaks.append(live.peak)
    chooser = model.runtime.activations.measure
    model.runtime.close()
    if offload_saved == "auto":
        # The second pass was the measured one: its choice is made as the third begins.
        assert chooser is not None and chooser.decision is not None
    return peaks


def test_the_measuring_pass_peaks_where_recomputing_does() -> None:
    """Autograd keeps a pack hook alive with every tensor saved through it: the measuring pass's
    hook must not hold the tensors it counted, or a block's whole graph lives until its
    backward ends instead of each tensor being freed once used (an MLP-wide tensor more here)."""
    recompute = step_peaks("never")
    measured = step_peaks("auto")
    assert recompute[0] == recompute[1] == recompute[2]
    assert measured[1] == recompute[1]  # the measuring pass (the third may keep graphs)
