"""The plan's step estimates for a model shape at some sequence lengths, against measured steps.

`offload plan` estimates each block's compute from FLOPs and its element-wise bytes at rates it
measures (docs/activations.md, "In offload plan"). This prints, per sequence length, the plan's
recomputing step and its phases, with the rates measured on this machine, and, given a
bench_activations JSON (--compare), the step measured there recomputing every block, so the
model's error is one line:

    python scripts/plan_estimate.py --size 7b --seqs 16384,32768 \\
        --compare benchmarks/results/activations_7b_16k-32k_cpu-busy_2026-11-24_h100.json --out $OUT/plan_7b.json

Rates are measured on CUDA (detection on); elsewhere the plan's assumed ones are used, which
checks the script, not the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, llama_config


def measured_steps(path: str | None) -> dict[int, float]:
    """Sequence length -> the recompute step in a bench_activations JSON (the recompute row's
    median step; else auto's own measured pass)."""
    if path is None:
        return {}
    out: dict[int, float] = {}
    for r in json.loads(Path(path).read_text())["results"]:
        if r.get("result") != "ok":
            continue
        if r["placement"] in ("recompute", "gpu"):
            out[r["seq"]] = r["step_s"]
        elif "recompute_measured_s" in r:
            out.setdefault(r["seq"], r["recompute_measured_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--seqs", default="16384,32768")
    ap.add_argument("--device-blocks", type=int, default=1)
    ap.add_argument("--compare", default=None, help="a bench_activations JSON with measured steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from offload.config import load_config
    from offload.plan import make_plan

    seqs = [int(s) for s in a.seqs.split(",")]
    cfg = llama_config(a.size, max(seqs))
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    cuda = torch.cuda.is_available()
    measured = measured_steps(a.compare)
    rows: list[dict[str, Any]] = []
    for seq in seqs:
        c = load_config(
            None,
            device="cuda" if cuda else "cpu",
            dtype="bfloat16",
            optimizer={"overlap_backward": True},
            placement={"device_blocks": a.device_blocks, "activations": "gpu", "offload_saved": "auto"},
        )
        p = make_plan(model, c, batch_size=1, seq_len=seq, detect=cuda)
        assert p.recompute is not None
        rates = [n for n in p.notes if n.startswith(("offload_saved: measured", "offload_saved: assumed"))]
        rows.append(
            {
                "seq": seq,
                "recompute_step_s": p.recompute.recompute_step_s,
                "kept_step_s": p.recompute.step_s,
                "choice": p.recompute.describe(),
                "phases": p.recompute.phases,
                "rates": rates,
                "measured_recompute_s": measured.get(seq),
            }
        )
    print(f"{'seq':>8} {'plan':>9} {'measured':>9} {'error':>7}  (recomputing every block, {a.size})")
    for r in rows:
        m = r["measured_recompute_s"]
        err = "" if m is None else f"{r['recompute_step_s'] / m - 1:+.1%}"
        shown = "-" if m is None else f"{m:.3f}"
        print(f"{r['seq']:>8} {r['recompute_step_s']:>8.3f}s {shown:>9} {err:>7}")
        for note in r["rates"]:
            print(f"         {note}")
    if a.out:
        report = {"date": date.today().isoformat(), "size": a.size, "args": vars(a), "rows": rows}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
        print(f"written {a.out}")


if __name__ == "__main__":
    main()
