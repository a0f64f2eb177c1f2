"""Attention's forward and backward at long sequences, by kernel, and through a kept call.

A block that keeps its attention (offload/engine/attention.py) runs the attention forward once
and, in backward, the kernel's backward from the kept output; a recomputed block runs the
forward twice. Which kernel runs matters as much: this times, on the 6.7B Llama's attention
shape (32 heads of 128, batch 1, causal, bfloat16), per sequence length:

    dispatcher   scaled_dot_product_attention as the dispatcher runs it (cuDNN on Hopper)
    flash        the same restricted to flash attention (sdpa_kernel)
    kept         offload's kept call: Capture's forward, then Replay's backward

each as forward ms, backward ms and TFLOPS of the pair (causal: half the square counted), the
median of --repeat runs after a warm-up. Prints a table and writes JSON (--out):

    python scripts/bench_attention.py --seqs 32768,131072 --out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # offload, run from a checkout


def forward(way: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, leaves: list[torch.Tensor]) -> Any:
    """The attention's output on leaves (the q, k, v that take the gradients), the way given."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from offload.engine.attention import Capture, Replay

    lq, lk, lv = leaves
    if way == "kept":
        with torch.no_grad(), Capture() as capture:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with Replay(capture.records, 0):
            return F.scaled_dot_product_attention(lq, lk, lv, is_causal=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if way == "flash" else contextlib.nullcontext():
        return F.scaled_dot_product_attention(lq, lk, lv, is_causal=True)


def run(way: str, seq: int, heads: int, dim: int, repeat: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, heads, seq, dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    fwd, bwd = [], []
    for i in range(repeat + 1):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        out = forward(way, q, k, v, leaves)
        marks[1].record()
        torch.autograd.grad(out, leaves, grad)
        marks[2].record()
        marks[2].synchronize()
        if i:  # the first is a warm-up
            fwd.append(marks[0].elapsed_time(marks[1]))
            bwd.append(marks[1].elapsed_time(marks[2]))
    flops = 4 * seq * seq * dim * heads / 2 * 3.5  # forward 1, backward 2.5 of the forward's
    f_ms, b_ms = statistics.median(fwd), statistics.median(bwd)
    return {
        "way": way,
        "seq": seq,
        "forward_ms": f_ms,
        "backward_ms": b_ms,
        "tflops": flops / ((f_ms + b_ms) / 1e3) / 1e12,
        "kernel": int(torch._fused_sdp_choice(q, k, v, None, 0.0, True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--ways", default="dispatcher,flash,kept")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device")
    rows = [
        run(way, int(seq), args.heads, args.dim, args.repeat)
        for seq in args.seqs.split(",")
        for way in args.ways.split(",")
    ]
    print(f"{'way':<12}{'seq':>8}{'forward ms':>12}{'backward ms':>13}{'TFLOPS':>8}")
    for r in rows:
        print(
            f"{r['way']:<12}{r['seq']:>8}{r['forward_ms']:>12.1f}{r['backward_ms']:>13.1f}{r['tflops']:>8.0f}"
        )
    print("(kernel the dispatcher picks: 1 flash, 3 cuDNN:", sorted({r["kernel"] for r in rows}), ")")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "date": date.today().isoformat(),
                    "device": torch.cuda.get_device_name(),
                    "host": platform.node(),
                    "torch": torch.__version__,
                    "args": vars(args),
                    "results": rows,
                },
                f,
                indent=1,
            )
        print("written", args.out)


if __name__ == "__main__":
    main()
