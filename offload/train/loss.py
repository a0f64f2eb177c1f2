"""Causal-LM cross-entropy in chunks of tokens (``train.loss_chunk``): the head's logits never
exist for the whole batch.

A Hugging Face causal LM computes the logits of every token, upcasts them to float32 and takes
the mean cross-entropy; backward then holds their float32 gradient too. That is vocab x 10
bytes per token in bf16: 39 GiB at 128K tokens and a 32K vocabulary, more than the model's
device blocks. Here the base model runs as usual up to its last hidden state, and the head and
the loss run per chunk of ``chunk`` tokens in one autograd Function that, as Liger Kernel's
fused linear cross-entropy does, takes the gradients in forward while the chunk's logits exist:
per chunk the logits (one matmul, upcast to float32), their log-sum-exp and loss, the softmax
minus the one-hot target divided by the number of targets (the gradient of the mean, cast to the
compute dtype as autograd's would be), and from it the hidden states' gradient and the head
weight's (accumulated in float32 over chunks). Backward scales those by the loss's gradient.
The device then holds one chunk's logits and the hidden states' gradient, not the batch's
logits (offload/plan/tally.py's working row counts it).

Targets are the model's: labels shifted by one, the last position of each sequence and labels
of -100 ignored, the mean over the rest. The result equals the model's loss to float32 rounding
(the sums run in another order; tests/test_loss.py). Models whose logits are scaled or capped
after the head (Gemma 2's softcapping, Cohere's logit scale) are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IGNORE = -100
_SCALED = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    """The mean next-token cross-entropy of batch (``input_ids``, ``labels``, optionally
    ``attention_mask``): the model's own loss with chunk None, else computed chunk tokens at a time."""
    if chunk is None:
        return model(**batch).loss
    base, head = _parts(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = base(**inputs, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return ChunkedCrossEntropy.apply(hidden, head.weight, batch["labels"], chunk)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The base model (up to the last hidden state) and the head of a Hugging Face causal LM."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or base is None or base is model:
        raise ValueError(
            f"train.loss_chunk: {type(model).__name__} is not a causal LM with a linear head without "
            "bias after its base model; leave loss_chunk null for the model's own loss"
        )
    config = getattr(model, "config", None)
    for name in _SCALED:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"train.loss_chunk: {type(model).__name__} scales or caps its logits ({name} = {value}), "
                "which the chunked loss does not; leave loss_chunk null"
            )
    return base, head


class ChunkedCrossEntropy(torch.autograd.Function):
    """``apply(hidden, weight, labels, chunk)``: the mean cross-entropy of ``hidden @ weight.T``
    against labels shifted by one (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        width = hidden.shape[-1]
        x = hidden.reshape(-1, width)
        target = nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(x.device)
        count = (target != IGNORE).sum()
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk):
            xc, tc = x[start : start + chunk], target[start : start + chunk]
            logits = (xc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = tc != IGNORE
            rows = valid.nonzero().squeeze(1)
            total += (lse[rows] - logits[rows, tc[rows]]).sum()
            # d(mean loss)/d(logits) = (softmax - one-hot) / count, zero for ignored rows.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[rows, tc[rows]] -= 1
            grad[~valid] = 0
            grad = grad.div_(count).to(x.dtype)
            if grad_x is not None:
                grad_x[start : start + chunk] = grad @ weight
            grad_w += (grad.t() @ xc).float()
        ctx.save_for_backward(grad_x if grad_x is not None else torch.empty(0), grad_w)
        ctx.shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        gx = (grad_x * grad.to(grad_x.dtype)).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None
