"""What a recomputed block's forward spends its time on, op by op, and what keeping op outputs
could save at best.

A recomputed block runs its forward again in backward. Keeping an op's output instead saves
that op's time for its bytes: offload keeps a block's attention output (engine/attention.py) or
its whole graph (engine/saved.py). This times one 6.7B Llama decoder layer's forward (bfloat16,
batch 1, autograd on, as the recompute runs it) per sequence length: each linear and attention
call (CUDA events around each), the rest (norms, rotary, activation, residuals) as what the whole
forward has beyond them, and the bytes each output and the whole graph hold.

From those it prices the best any keep of op outputs could do over --blocks blocks with
--room-gib of memory for kept bytes: the outputs with the most milliseconds per GiB first
(an upper bound: no copies, no windows, no allocator). Prints a table and writes JSON (--out):

    python scripts/probe_block_ops.py --seqs 16384,32768 --room-gib 40,60,80 --out $OUT/block_ops.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, llama_config

GIB = 1 << 30
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # a Llama layer's linear calls, in order


class Timed(TorchFunctionMode):
    """Records CUDA events around each linear and attention call, and its output's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in (F.linear, F.scaled_dot_product_attention):
            return func(*args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = func(*args, **kwargs)
        end.record()
        nbytes = out.nbytes
        if func is F.scaled_dot_product_attention:  # and its log-sum-exp, one float a head and row
            nbytes += out.shape[0] * out.shape[1] * out.shape[2] * 4
        linear = sum(1 for c in self.calls if c[0] != "attention")
        name = "attention" if func is F.scaled_dot_product_attention else LINEARS[linear % len(LINEARS)]
        self.calls.append((name, start, end, nbytes))
        return out


def layer_ops(seq: int, repeat: int) -> dict[str, Any]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = llama_config("7b", seq)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).to("cuda", torch.bfloat16)
    x = torch.randn(1, seq, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rotary = LlamaRotaryEmbedding(config).to("cuda")
    pos = torch.arange(seq, device="cuda")[None]
    emb = rotary(x, pos)

    def forward() -> Any:
        return layer(x, position_embeddings=emb, position_ids=pos)

    whole: list[float] = []
    per_op: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for i in range(repeat + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = forward()
        b.record()
        b.synchronize()
        del out
        with Timed() as timed:
            out = forward()
        torch.cuda.synchronize()
        del out
        if i:  # the first is a warm-up
            whole.append(a.elapsed_time(b))
            for name, s, e, nbytes in timed.calls:
                per_op.setdefault(name, []).append(s.elapsed_time(e))
                sizes[name] = nbytes
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    ops = [{"op": n, "ms": statistics.median(v), "bytes": sizes[n]} for n, v in per_op.items()]
    forward_ms = statistics.median(whole)
    return {
        "seq": seq,
        "forward_ms": forward_ms,
        "ops": ops,
        "rest_ms": forward_ms - sum(o["ms"] for o in ops),
        "graph_bytes": sum(seen.values()),
    }


def best_keep(ops: list[dict[str, Any]], blocks: int, room: int) -> tuple[float, int]:
    """The most forward milliseconds, over blocks, that room bytes of kept op outputs save (the
    outputs with the most ms per byte first, the last one in part), and the bytes they hold."""
    saved_ms, held = 0.0, 0
    for o in sorted(ops, key=lambda o: o["ms"] / o["bytes"], reverse=True):
        take = min(blocks * o["bytes"], room - held)
        if take <= 0:
            break
        saved_ms += o["ms"] * take / o["bytes"]
        held += take
    return saved_ms, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="16384,32768")
    ap.add_argument("--blocks", type=int, default=SHAPES["7b"][2])
    ap.add_argument("--room-gib", default="40,60,80", help="memory for kept bytes to price, GiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        r = layer_ops(seq, args.repeat)
        r["best"] = []
        for room in (float(g) for g in args.room_gib.split(",")):
            ms, held = best_keep(r["ops"], args.blocks, int(room * GIB))
            r["best"].append({"room_GiB": room, "saved_s": ms / 1e3, "held_GiB": held / GIB})
        rows.append(r)
        torch.cuda.empty_cache()
        print(f"\n{seq} tokens: forward {r['forward_ms']:.2f} ms, graph {r['graph_bytes'] / GIB:.2f} GiB")
        for o in r["ops"]:
            per = o["ms"] / (o["bytes"] / GIB)
            print(f"  {o['op']:9} {o['ms']:7.2f} ms {o['bytes'] / GIB:6.3f} GiB {per:7.1f} ms/GiB")
        print(f"  {'rest':9} {r['rest_ms']:7.2f} ms")
        for b in r["best"]:
            print(
                f"  at best with {b['room_GiB']:.0f} GiB: {b['saved_s']:.3f} s of the "
                f"{args.blocks * r['forward_ms'] / 1e3:.3f} s the recompute takes ({b['held_GiB']:.1f} GiB)"
            )
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "host": platform.node(),
        "torch": torch.__version__,
        "blocks": args.blocks,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
