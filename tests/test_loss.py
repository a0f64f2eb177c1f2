"""The chunked causal-LM loss (offload/train/loss.py): the model's loss and gradients to float32
rounding, wrapped or not, at any chunk size; models it cannot do are refused by name; the plan's
working row shrinks to one chunk's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import offload
from offload.config import ConfigError, Tier, from_dict, load_config
from offload.plan import make_plan
from offload.train.loss import causal_lm_loss
from offload.train.recipe import TrainSpec
from tests.models import Stack, batches, tiny


def batch(ignore: bool = True) -> dict[str, torch.Tensor]:
    ids = batches(1)[0]
    labels = ids.clone()
    if ignore:
        labels[0, 3] = labels[1, 9] = -100
    return {"input_ids": ids, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# float32: the chunked loss sums its rows and its head gradient over chunks in another order
# than one cross-entropy over the whole batch; both are float32 sums of a few hundred terms.
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_equals_the_models_loss_and_gradients(family: str, chunk: int) -> None:
    model = tiny(family, layers=2)
    twin = copy.deepcopy(model)
    b = batch()
    want = causal_lm_loss(model, b, None)
    want.backward()
    got = causal_lm_loss(twin, b, chunk)
    got.backward()
    torch.testing.assert_close(got, want, **TOL)
    expected = grads(model)
    assert grads(twin).keys() == expected.keys()
    for name, g in grads(twin).items():
        torch.testing.assert_close(g, expected[name], **TOL, msg=name)


def test_a_scaled_loss_scales_its_gradients() -> None:
    """grad_accum divides the loss: the gradients saved in forward are scaled in backward."""
    model = tiny("llama", layers=1)
    twin = copy.deepcopy(model)
    (causal_lm_loss(model, batch(), None) / 4).backward()
    (causal_lm_loss(twin, batch(), 5) / 4).backward()
    for name, g in grads(twin).items():
        torch.testing.assert_close(g, grads(model)[name], **TOL, msg=name)


def test_a_wrapped_model_trains_like_its_own_loss() -> None:
    runs = []
    for chunk in (None, 6):
        model, opt = offload.wrap(tiny("llama", layers=3), device="cpu", dtype="float32")
        losses = []
        for ids in batches(3):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, chunk)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs.append((losses, offload.state_dict(model)))
        model.runtime.close()
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[0][0]), **TOL)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_models_it_cannot_do_are_refused() -> None:
    with pytest.raises(ValueError, match=r"train\.loss_chunk: Stack is not a causal LM with a linear head"):
        causal_lm_loss(Stack(), batch(), 4)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"scales or caps its logits \(final_logit_softcapping = 30.0\)"):
        causal_lm_loss(LlamaForCausalLM(cfg), batch(), 4)


def test_loss_chunk_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="loss_chunk = 0: must be >= 1, or null for the model's own loss"):
        from_dict(TrainSpec, {"steps": 1, "batch_size": 1, "seq_len": 8, "loss_chunk": 0})


def test_the_plan_counts_one_chunk_of_logits() -> None:
    """With the chunked loss the working row is the larger of the loss's transients (one chunk
    of logits, the hidden states' gradient, an fp32 head gradient) and one block's recompute
    and backward (14 hidden-wide and 6 MLP-wide tensors a token)."""
    cfg = load_config(device="cpu", dtype="float32")
    model = tiny("llama", layers=2)
    vocab, hidden, inter, tokens = 96, 48, 96, 32
    whole = make_plan(model, cfg, batch_size=2, seq_len=16)
    assert whole.get("working", Tier.GPU) == tokens * ((4 * hidden + 3 * inter) * 4 + vocab * 12)
    block = tokens * (14 * hidden + 6 * inter) * 4
    loss = 8 * vocab * 12 + tokens * hidden * 4 + 4 * vocab * hidden
    chunked = make_plan(model, cfg, batch_size=2, seq_len=16, loss_chunk=8)
    assert chunked.get("working", Tier.GPU) == max(block, loss) == block
    tiny_vocab_chunks = make_plan(model, cfg, batch_size=2, seq_len=16, loss_chunk=1)
    assert tiny_vocab_chunks.get("working", Tier.GPU) == block
