"""Peak device memory and step time against sequence length, for each activation placement.

One wrapped model (default the 6.7B Llama shape, batch 1) trains a few steps at each sequence
length under each placement:

    gpu          boundary states on the device, every block recomputed (the default)
    host         boundary states in pinned host memory, every block recomputed
    nvme         boundary states in files under --nvme-dir, every block recomputed
    offload      boundary states on the device, offload_saved auto: the first step measures,
                 then the blocks the cost model picks keep their saved tensors in host memory
    offload-all  offload_saved always (every block)

An out-of-memory step is reported as "OOM" and the next configuration goes on. Prints a table
and writes JSON (--out). The model is wrapped once (about a minute for 6.7B) and its placement
switched between runs, so a full sweep fits the device tool's 10-minute limit:

    python scripts/bench_activations.py --size 7b --seqs 2048,8192,16384,32768 \
        --placements gpu,host,offload --out $OUT/activations_7b.json
    python scripts/bench_activations.py --size tiny --device cpu --seqs 64,128 --steps 2   # a check
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROOT, SHAPES, llama_config

PLACEMENTS: dict[str, dict[str, Any]] = {
    "gpu": {"activations": "gpu", "offload_saved": "never"},
    "host": {"activations": "host", "offload_saved": "never"},
    "nvme": {"activations": "nvme", "offload_saved": "never"},
    "offload": {"activations": "gpu", "offload_saved": "auto"},
    "offload-all": {"activations": "gpu", "offload_saved": "always"},
}


def switch(model: Any, placement: dict[str, Any]) -> Any:
    """Gives the wrapped model new Activations for placement (the old ones closed); returns them."""
    from offload.config import load_config
    from offload.engine.function import BlockProxy, make_activations

    rt = model.runtime
    rt.activations.close()
    rt.cfg = load_config(rt.cfg, placement=placement)
    rt.activations = make_activations(rt.cfg, rt.executor)
    for m in model.modules():
        if isinstance(m, BlockProxy):
            m.activations = rt.activations
    return rt.activations


def run_one(model: Any, opt: Any, a: argparse.Namespace, seq: int, name: str) -> dict[str, Any]:
    import torch

    acts = switch(model, PLACEMENTS[name])
    cuda = a.device.startswith("cuda")
    x = torch.randint(0, 32000 if a.size != "tiny" else 1000, (a.batch, seq), device=a.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    try:
        for _ in range(a.steps):
            t = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            loss_value = loss.item()  # syncs the device
            del loss
            times.append(time.perf_counter() - t)
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad()
        gc.collect()
        return {"placement": name, "seq": seq, "result": "OOM", "steps": times}
    model.runtime.wait_updates()
    steady = times[2:] if name.startswith("offload") and len(times) > 2 else times[1:] or times
    out: dict[str, Any] = {
        "placement": name,
        "seq": seq,
        "result": "ok",
        "step_s": sorted(steady)[len(steady) // 2],
        "steps": times,
        "loss": loss_value,
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    if acts.measure is not None and acts.measure.decision is not None:
        d = acts.measure.decision
        out["offloaded_blocks"] = d.blocks
        out["choice"] = d.describe()
        out["estimated_step_s"] = d.step_s
        out["estimated_recompute_step_s"] = d.recompute_step_s
    elif PLACEMENTS[name]["offload_saved"] == "always":
        out["offloaded_blocks"] = "all"
    return out


def table(results: list[dict[str, Any]], seqs: list[int], names: list[str]) -> str:
    lines = [f"{'placement':<12}" + "".join(f"{s:>22}" for s in seqs)]
    for name in names:
        cells = []
        for s in seqs:
            r = next(r for r in results if r["placement"] == name and r["seq"] == s)
            if r["result"] != "ok":
                cells.append(f"{r['result']:>22}")
                continue
            peak = "-" if r["peak_gpu_GiB"] is None else f"{r['peak_gpu_GiB']:.1f} GiB"
            cells.append(f"{r['step_s']:>9.3f} s {peak:>10}")
        lines.append(f"{name:<12}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqs", default="2048,8192,16384,32768")
    ap.add_argument("--placements", default="gpu,host,offload")
    ap.add_argument("--steps", type=int, default=3, help="per run; offload's first step measures")
    ap.add_argument("--device-blocks", type=int, default=0)
    ap.add_argument("--nvme-dir", default="/tmp/offload-act")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    seqs = [int(s) for s in a.seqs.split(",")]
    names = a.placements.split(",")
    for n in names:
        if n not in PLACEMENTS:
            ap.error(f"--placements: {n!r} is not one of {', '.join(PLACEMENTS)}")

    import torch
    from transformers import LlamaForCausalLM

    import offload

    cfg = llama_config(a.size, max(seqs))
    if a.size == "tiny":
        cfg.vocab_size = 1000
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model, opt = offload.wrap(
        model,
        init="random",
        device=a.device,
        dtype="bfloat16" if a.device.startswith("cuda") else "float32",
        placement={"device_blocks": a.device_blocks},
        optimizer={"lr": 1e-5, "overlap_backward": True},
        nvme_dirs=[a.nvme_dir],
    )
    print(f"wrapped in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for seq in seqs:
        for name in names:
            r = run_one(model, opt, a, seq, name)
            print(json.dumps({k: v for k, v in r.items() if k != "steps"}), flush=True)
            results.append(r)
    model.runtime.close()
    print()
    print(table(results, seqs, names))
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "date": date.today().isoformat(),
        "device": device,
        "host": platform.node(),
        "size": a.size,
        "batch": a.batch,
        "args": vars(a),
        "results": results,
    }
    out = a.out or str(ROOT / "benchmarks" / "results" / f"activations_{a.size}_{report['date']}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    print("written", out)


if __name__ == "__main__":
    main()
