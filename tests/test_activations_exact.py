"""Where activations wait does not change the mathematics: tiny models in float32 on the CPU,
with boundary states on gpu (the device), host or nvme, and with saved tensors offloaded instead
of recomputed, train bitwise like each other and like plain PyTorch with
torch.optim.AdamW(fused=True) (tests/test_wrap_exact.py explains why bitwise holds there)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import offload
from tests.models import batches, tiny

STEPS = 6
PLACEMENTS = {
    "gpu": {"activations": "gpu"},
    "host": {"activations": "host"},
    "nvme": {"activations": "nvme"},
    "offload": {"offload_saved": "always"},
    "offload+nvme": {"offload_saved": [0, 2], "activations": "nvme"},
    "auto+host": {"offload_saved": "auto", "activations": "host"},
}


def train_reference(model, data, accum, clip):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(accum):
            ids = data[step * accum + micro]
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += loss.item()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model.state_dict()


def train(model, data, placement, accum, clip, nvme_dir):
    wrapped, opt = offload.wrap(
        model,
        device="cpu",
        dtype="float32",
        optimizer={"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": clip},
        placement=placement,
        nvme_dirs=[str(nvme_dir)],
    )
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(accum):
            ids = data[step * accum + micro]
            loss = wrapped(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    state = offload.state_dict(wrapped)
    wrapped.runtime.close()
    return losses, state


@pytest.mark.parametrize(
    ("family", "dropout", "accum", "clip"), [("llama", 0.0, 1, None), ("gpt2", 0.1, 2, 0.5)]
)
def test_every_placement_trains_like_adamw(
    family: str, dropout: float, accum: int, clip: float | None, disk_dir: Path
) -> None:
    ref = tiny(family, dropout=dropout)
    data = batches(STEPS * accum)
    torch.manual_seed(123)  # dropout draws: every run starts from the same generator state
    want_losses, want_state = train_reference(copy.deepcopy(ref), data, accum, clip)
    for name, placement in PLACEMENTS.items():
        torch.manual_seed(123)
        losses, state = train(copy.deepcopy(ref), data, placement, accum, clip, disk_dir)
        assert losses == want_losses, name  # bitwise
        for key in want_state:
            assert torch.equal(state[key], want_state[key]), (name, key)
    assert not any(disk_dir.iterdir())  # the nvme runs removed their files


def test_device_blocks_with_offloaded_saved_tensors(disk_dir: Path) -> None:
    """Blocks whose weights stay on the device keep references to their own buffers."""
    ref = tiny("qwen2")
    data = batches(STEPS)
    want = train(copy.deepcopy(ref), data, {}, 1, None, disk_dir)
    got = train(
        copy.deepcopy(ref),
        data,
        {"device_blocks": 1, "offload_saved": "always", "activations": "host"},
        1,
        None,
        disk_dir,
    )
    assert got[0] == want[0]
    for key in want[1]:
        assert torch.equal(got[1][key], want[1][key]), key
