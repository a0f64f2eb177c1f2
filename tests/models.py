"""Tiny Hugging Face models for tests, built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def tiny(family: str, layers: int = 3, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # The Llama-like families share their sizes (Mistral adds a sliding window, Qwen2 ties).
    sizes = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=8, **sizes))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **sizes))
    elif family == "gpt2":
        cfg = GPT2Config(
            n_embd=48,
            n_layer=layers,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model.float()


def small_llama(kv_heads: int = 8, seed: int = 0) -> LlamaForCausalLM:
    """The GPU tests' Llama, float32: 4 layers of hidden 256 (8 heads of 32; kv_heads of them
    for keys and values), vocabulary 512, 256 positions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        vocab_size=512,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).float()


def batches(n: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


class Block(torch.nn.Module):
    """A block with little compute per byte of weights: a missing wait shows up as wrong numbers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class Stack(torch.nn.Module):
    """A plain model (no Hugging Face): input projection, identical blocks, head, MSE loss."""

    def __init__(self, d: int = 32, layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(8, d)
        self.layers = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return torch.nn.functional.mse_loss(self.head(h).squeeze(-1), y)


def run_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    accum: int,
    batch_of: Callable[[int, int], torch.Tensor],
    reduce: Callable[[float], float] = float,
) -> list[float]:
    """The plain training loop of the exactness tests: per step, accum micro-batches
    ``batch_of(step, micro)`` (the loss divided by accum, as a reference loop does), then
    step() and zero_grad(). Returns each step's loss, passed through reduce (e.g. a mean over
    ranks)."""
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accum):
            ids = batch_of(step, micro)
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(reduce(total))
    return losses
