"""Where activations wait does not change the mathematics: tiny models in float32 on the CPU,
with boundary states on gpu (the device), host or nvme, and with blocks that keep their graph
(on the device or in host memory) or their attention output (on the device or in host memory)
instead of being recomputed, train bitwise like each other and like plain PyTorch with
torch.optim.AdamW(fused=True) (tests/test_wrap_exact.py explains why bitwise holds there)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.models import batches, tiny
from tests.test_wrap_exact import STEPS, train_offload, train_reference

PLACEMENTS = {
    "gpu": {"activations": "gpu"},
    "host": {"activations": "host"},
    "nvme": {"activations": "nvme"},
    "offload": {"offload_saved": "always"},
    "offload+nvme": {"offload_saved": [0, 2], "activations": "nvme"},
    "auto+host": {"offload_saved": "auto", "activations": "host"},
    "device": {"offload_saved": {"device": [0, 1, 2]}},
    "attention": {"offload_saved": {"attention": [0, 1, 2]}},
    "attention_host+nvme": {"offload_saved": {"attention_host": [0, 1, 2]}, "activations": "nvme"},
    "mixed": {"offload_saved": {"device": [2], "host": [0], "attention_host": [1]}, "activations": "host"},
}


def assert_every_placement_matches(ref, data, accum, clip, placements, disk_dir: Path) -> None:
    want = copy.deepcopy(ref)
    torch.manual_seed(123)  # dropout draws: every run starts from the same generator state
    want_losses = train_reference(want, data, accum, 3e-3, 0.1, clip, fused=True)
    want_state = want.state_dict()
    for name, placement in placements.items():
        torch.manual_seed(123)
        losses, state = train_offload(
            copy.deepcopy(ref), data, accum, 3e-3, 0.1, clip, placement, nvme_dirs=[str(disk_dir)]
        )
        assert losses == want_losses, name  # bitwise
        for key in want_state:
            assert torch.equal(state[key], want_state[key]), (name, key)


@pytest.mark.parametrize(
    ("family", "dropout", "accum", "clip"), [("llama", 0.0, 1, None), ("gpt2", 0.1, 2, 0.5)]
)
def test_every_placement_trains_like_adamw(
    family: str, dropout: float, accum: int, clip: float | None, disk_dir: Path
) -> None:
    data = batches(STEPS * accum)
    assert_every_placement_matches(tiny(family, dropout=dropout), data, accum, clip, PLACEMENTS, disk_dir)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_kept_attention_and_graphs_in_other_families(family: str, disk_dir: Path) -> None:
    """Mistral passes a mask (its attention is recomputed, not kept); Qwen2 ties its embeddings."""
    placements = {
        "attention": {"offload_saved": {"attention": [0, 1], "device": [2]}},
        "attention_host": {"offload_saved": {"attention_host": [0, 2], "host": [1]}},
    }
    assert_every_placement_matches(tiny(family), batches(STEPS), 1, None, placements, disk_dir)


def test_device_blocks_with_offloaded_saved_tensors(disk_dir: Path) -> None:
    """Blocks whose weights stay on the device keep references to their own buffers."""
    placements = {
        "host": {"device_blocks": 1, "offload_saved": "always", "activations": "host"},
        "device": {"device_blocks": 1, "offload_saved": {"device": [0, 1], "attention": [2]}},
    }
    assert_every_placement_matches(tiny("qwen2"), batches(STEPS), 1, None, placements, disk_dir)


def test_host_keeps_brought_back_in_parts_train_like_adamw(
    monkeypatch: pytest.MonkeyPatch, disk_dir: Path
) -> None:
    """Host-kept graphs and attention outputs spaced apart come back in parts over the blocks
    between (the smallest part lowered so tiny groups split): still bitwise."""
    monkeypatch.setattr("offload.engine.activations.PACE_MIN_BYTES", 64)
    placements = {
        "graphs": {"offload_saved": {"host": [0, 4]}},
        "mixed": {
            "offload_saved": {"host": [0], "attention_host": [1, 4], "device": [3]},
            "activations": "host",
        },
    }
    assert_every_placement_matches(tiny("llama", layers=5), batches(STEPS), 1, None, placements, disk_dir)
