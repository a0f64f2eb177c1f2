"""Keeping a block's attention output and log-sum-exp (offload/engine/attention.py): a recompute
answered from what the forward kept gives bitwise the gradients of a plain recompute, calls that
cannot be kept are recomputed, and the bytes kept are what the planner counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import offload
from offload.engine import function
from offload.engine.attention import CUDNN, Capture, Probe, Replay
from offload.plan.activations import count_block
from tests.models import batches, tiny


def qkv(heads: int = 4, kv_heads: int = 2, seq: int = 16, dim: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, dim, generator=g)
    k = torch.randn(2, kv_heads, seq, dim, generator=g)
    v = torch.randn(2, kv_heads, seq, dim, generator=g)
    return q, k, v


def attend(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True, **kw)


@pytest.mark.parametrize("causal", [True, False])
def test_a_kept_call_backpropagates_bitwise_like_sdpa(causal: bool) -> None:
    q, k, v = qkv()
    with torch.no_grad(), Capture() as capture:
        out = attend(q, k, v, is_causal=causal)
    assert torch.equal(out, attend(q, k, v, is_causal=causal))
    (kept,) = capture.records
    assert kept is not None and kept.nbytes == out.numel() * 4 + 2 * 4 * 16 * 4  # out + lse
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    with Replay(capture.records, 0) as replay:
        again = attend(*leaves, is_causal=causal)
    assert replay.pos == 1 and torch.equal(again, out)
    got = torch.autograd.grad(again, leaves, grad)
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attend(*plain, is_causal=causal), plain, grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize(
    "kwargs", [{"attn_mask": torch.ones(16, 16, dtype=torch.bool).tril()}, {"dropout_p": 0.5}]
)
def test_a_call_with_a_mask_or_dropout_is_not_kept(kwargs: dict) -> None:
    q, k, v = qkv()
    with torch.no_grad(), Capture() as capture:
        attend(q, k, v, **kwargs)
    assert capture.records == [None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with Replay(capture.records, 0):
        out = attend(*leaves, **kwargs)
    assert out.grad_fn is not None and "Kept" not in type(out.grad_fn).__name__  # computed


def test_replay_refuses_calls_the_forward_did_not_make() -> None:
    q, k, v = qkv()
    with torch.no_grad(), Capture() as capture:
        attend(q, k, v, is_causal=True)
    with (
        pytest.raises(RuntimeError, match="block 3's recompute calls attention with shape"),
        Replay(capture.records, 3),
    ):
        attend(*qkv(seq=8), is_causal=True)
    more = r"block 3's recompute made more attention calls than its forward \(1\)"
    with pytest.raises(RuntimeError, match=more), Replay(capture.records, 3):
        attend(q, k, v, is_causal=True)
        attend(q, k, v, is_causal=True)


def test_probe_times_and_counts_without_changing_the_result() -> None:
    q, k, v = qkv()
    with torch.no_grad(), Probe(cuda=False) as probe:
        out = attend(q, k, v, is_causal=True)
    assert torch.equal(out, attend(q, k, v, is_causal=True))
    assert probe.calls == 1 and probe.keepable and probe.seconds() >= 0
    assert probe.nbytes == out.numel() * 4 + 2 * 4 * 16 * 4
    with torch.no_grad(), Probe(cuda=False) as masked:
        attend(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    assert not masked.keepable


def test_the_recompute_of_a_kept_block_skips_its_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attention call of the blocks' recomputes is answered from what forward kept."""
    replays: list[Replay] = []

    class Spy(Replay):
        def __init__(self, records, index):  # type: ignore[no-untyped-def]
            super().__init__(records, index)
            replays.append(self)

    monkeypatch.setattr(function, "Replay", Spy)
    model, _ = offload.wrap(
        tiny("llama", layers=3),
        device="cpu",
        dtype="float32",
        placement={"offload_saved": {"attention": [0, 2], "attention_host": [1]}},
    )
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert sorted(r.index for r in replays) == [0, 1, 2]
    assert all(r.pos == 1 and r.records[0] is not None for r in replays)
    model.runtime.close()


def test_the_planner_counts_what_a_host_keep_holds() -> None:
    counted = count_block(tiny("llama", layers=3), "float32", 2, 16)
    model, _ = offload.wrap(
        tiny("llama", layers=3),
        device="cpu",
        dtype="float32",
        placement={"offload_saved": {"attention_host": [0, 1, 2]}},
    )
    ids = batches(1)[0]
    loss = model(input_ids=ids, labels=ids).loss
    assert model.runtime.activations.stored_bytes() == 3 * counted.attention
    loss.backward()
    assert model.runtime.activations.stored_bytes() == 0
    model.runtime.close()


def test_a_masked_model_counts_no_attention_to_keep() -> None:
    """Mistral's sliding window passes a mask: its attention is not kept, and not counted."""
    assert count_block(tiny("mistral", layers=2), "float32", 2, 16).attention == 0
    assert (
        count_block(tiny("llama", layers=2), "float32", 2, 16).attention
        == 2 * 4 * 16 * 12 * 4 + 2 * 4 * 16 * 4
    )


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("causal", [True, False])
def test_on_cuda_a_kept_call_runs_the_dispatchers_kernel_bitwise(causal: bool) -> None:
    """On CUDA the kept call runs the kernel the dispatcher picks (cuDNN on Hopper, else flash),
    so its output and gradients are bitwise those of SDPA; a host round trip keeps the kernel.
    Without the causal mask cuDNN's own backward is not deterministic in the queries' gradient
    (two plain runs differ, as measured on the H100): that one agrees to rounding."""
    from offload.engine.attention import AttentionKeep
    from offload.engine.device import Device

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    choice = int(torch._fused_sdp_choice(q, k, v, None, 0.0, causal))
    with torch.no_grad(), Capture() as capture:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    (kept,) = capture.records
    assert kept is not None and kept.kernel == choice
    keep = AttentionKeep(Device("cuda"), 1)
    records = keep.get(keep.put(0, capture.records, host=True))
    assert records[0] is not None and records[0].kernel == choice
    grad = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
    for recs in (capture.records, records):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with Replay(recs, 0):
            again = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        assert torch.equal(again, out)
        got = torch.autograd.grad(again, leaves, grad)
        plain = [t.clone().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(F.scaled_dot_product_attention(*plain, is_causal=causal), plain, grad)
        for i, (a, b) in enumerate(zip(got, want)):
            if causal or i or choice != CUDNN:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    keep.close()


@cuda
def test_on_cuda_grouped_queries_are_kept_and_backpropagate_to_rounding() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    with torch.no_grad(), Capture() as capture:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert capture.records[0] is not None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with Replay(capture.records, 0):
        again = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(again, out)
    grad = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
    got = torch.autograd.grad(again, leaves, grad)
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(
        F.scaled_dot_product_attention(*plain, is_causal=True, enable_gqa=True), plain, grad
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
