"""Peak device memory and step time against sequence length, for each activation placement, and
recompute against offload_saved auto's choice.

One wrapped model (default the 6.7B Llama shape, batch 1) trains a few steps at each sequence
length under each placement:

    gpu / recompute    boundary states on the device, every block recomputed (the default)
    host               boundary states in pinned host memory, every block recomputed
    nvme               boundary states in files under --nvme-dir, every block recomputed
    auto (offload)     boundary states on the device, offload_saved auto: two recomputed
                       steps (the second measured), then what the cost model picks per block
    auto-host          the same with the boundary states in host memory
    auto-nvme          the same with the boundary states on --nvme-dir (host memory left to keeps)
    offload-all        every block's graph in host memory (offload_saved always)
    device-all         every block's graph on the device
    attention-all      every block's attention output and log-sum-exp on the device
    attention-host-all the same in host memory

For auto it prints the choice per block (device / host / attention / recompute), its estimated
step against recomputing, and what bounds the step; the table shows the median step after the
choice and the peak device memory. An out-of-memory step is reported as "OOM" and the next
configuration goes on, after what the failed one held is freed: each run records the device
memory allocated at its start (start_allocated_GiB; a warning when it is above the first run's),
and its peaks allocated and reserved. Prints a table and writes JSON (--out). The model is wrapped once (about
a minute for 6.7B) and its placement switched between runs, so a sweep fits the device tool's
10-minute limit:

    python scripts/bench_activations.py --size 7b --seqs 2048,8192,16384,32768 \\
        --placements recompute,auto,host,auto-host --device-blocks 10 --out $OUT/activations_7b.json
    python scripts/bench_activations.py --size 7b --seqs 131072 --placements host,auto-host \\
        --device-blocks 10 --loss-chunk 8192 --steps 2 --out $OUT/activations_7b_128k.json
    python scripts/bench_activations.py --size 7b --seqs 16384,32768 --placements recompute,auto,auto-host \
        --device-blocks auto --out $OUT/activations_7b_long.json   # the plan's device blocks for 32K
    python scripts/bench_activations.py --size tiny --device cpu --seqs 64,128 --steps 2   # a check

With --trace PATH the runtime writes its Chrome trace there, and each row gets ``trace_steps``:
per step its wall time and the seconds each lane of the timeline was busy in it (compute, the
weights' h2d and d2h, the optimizer), so a step slower than its estimate shows where it waited.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROOT, SHAPES, llama_config
from probe_pinning import delta, vmstat

Placement = Callable[[int], dict[str, Any]]  # blocks -> placement
PLACEMENTS: dict[str, Placement] = {
    "gpu": lambda n: {"activations": "gpu", "offload_saved": "never"},
    "host": lambda n: {"activations": "host", "offload_saved": "never"},
    "nvme": lambda n: {"activations": "nvme", "offload_saved": "never"},
    "auto": lambda n: {"activations": "gpu", "offload_saved": "auto"},
    "auto-host": lambda n: {"activations": "host", "offload_saved": "auto"},
    "auto-nvme": lambda n: {"activations": "nvme", "offload_saved": "auto"},
    "offload-all": lambda n: {"activations": "gpu", "offload_saved": "always"},
    "device-all": lambda n: {"activations": "gpu", "offload_saved": {"device": list(range(n))}},
    "attention-all": lambda n: {"activations": "gpu", "offload_saved": {"attention": list(range(n))}},
    "attention-host-all": lambda n: {
        "activations": "host",
        "offload_saved": {"attention_host": list(range(n))},
    },
}
PLACEMENTS["recompute"] = PLACEMENTS["gpu"]
PLACEMENTS["offload"] = PLACEMENTS["auto"]  # its name before the per-block choice
AUTO_WARMUP = 2  # recomputed steps before auto decides (engine/choice.py: one warm-up, one measured)
LEFTOVER_GIB = 0.25  # more allocated at a run's start than at the first run's: reported as left behind


def switch(model: Any, placement: dict[str, Any]) -> Any:
    """Gives the wrapped model new Activations for placement (the old ones closed); returns them."""
    from offload.config import load_config
    from offload.engine.function import BlockProxy, make_activations

    rt = model.runtime
    rt.activations.close()
    # Reset first: a mapping given before would be merged with the new one.
    rt.cfg = load_config(load_config(rt.cfg, placement={"offload_saved": "never"}), placement=placement)
    rt.activations = make_activations(rt.cfg, rt.executor, rt.updater)
    for m in model.modules():
        if isinstance(m, BlockProxy):
            m.activations = rt.activations
    return rt.activations


def step(model: Any, opt: Any, x: Any, loss_chunk: int | None) -> float:
    from offload.train.loss import causal_lm_loss

    loss = causal_lm_loss(model, {"input_ids": x, "labels": x}, loss_chunk)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.item())  # syncs the device


def clean_slate(model: Any, opt: Any, cuda: bool) -> dict[str, float]:
    """Frees what an earlier run left on the device and starts the peak statistics afresh;
    returns the device memory allocated and reserved now (GiB), which the run's figures include.

    After an out-of-memory step this runs outside the except block that caught it: there the
    traceback still holds the step's frames and their tensors, and gc.collect() cannot free
    them. Here they are gone but for reference cycles (frames, exceptions, context managers),
    which gc.collect() breaks. The failed step's gradients (the residents' on the device), the
    stores' last groups and kept graphs (closed with the activations), and the allocator's
    cached blocks go too, so each (placement, sequence) starts from the same memory."""
    import torch

    model.runtime.wait_updates()  # updates a failed backward had already queued
    opt.zero_grad()
    model.runtime.activations.close()
    gc.collect()
    if not cuda:
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.reset_accumulated_memory_stats()  # the run's allocator retries and cudaMallocs
    return {
        "start_allocated_GiB": torch.cuda.memory_allocated() / 2**30,
        "start_reserved_GiB": torch.cuda.memory_reserved() / 2**30,
    }


def run_one(model: Any, opt: Any, a: argparse.Namespace, seq: int, name: str) -> dict[str, Any]:
    import torch

    blocks = model.config.num_hidden_layers
    placement = PLACEMENTS[name](blocks)
    cuda = a.device.startswith("cuda")
    start = clean_slate(model, opt, cuda)
    acts = switch(model, placement)
    auto = placement["offload_saved"] == "auto"
    x = torch.randint(0, model.config.vocab_size, (a.batch, seq), device=a.device)
    times: list[float] = []
    steps = a.steps + (AUTO_WARMUP if auto else 0)
    head = {"placement": name, "seq": seq, **start}
    failed = False
    baseline = 0  # 1 where auto's choice grew the staging leases: a pass recomputes with them first
    tracer = model.runtime.tracer
    host: list[dict[str, float]] = []  # after each step: the process's and the pools' host GiB,
    # and the CPU optimizer's busy seconds in it (its waits for gradients left out)
    busy = model.runtime.updater.busy_s
    try:
        while len(times) < steps + baseline:
            t, counters = time.perf_counter(), vmstat()
            with tracer.span("step", "host", placement=name, seq=seq, step=len(times)):
                loss_value = step(model, opt, x, a.loss_chunk)
            times.append(time.perf_counter() - t)
            busy, was = model.runtime.updater.busy_s, busy
            # The kernel's compaction, reclaim and huge-page counters over the step, where they moved.
            host.append({**_host_now(acts), "cpu_busy_s": busy - was, "vmstat": delta(counters, vmstat())})
            d = acts.measure.decision if acts.measure is not None else None
            baseline = int(d is not None and bool(d.staging) and bool(d.blocks or d.reverted))
    except torch.cuda.OutOfMemoryError:
        failed = True  # freed by the next run's clean_slate, once this traceback is gone
    if failed:
        del x
        return {
            **head,
            "result": "OOM",
            "steps": times,
            "host_GiB": host,
            **_peaks(cuda),
            **_choice(acts),
            **_staging(acts),
        }
    model.runtime.wait_updates()
    # Steady steps: after the first (warm-up) one; for auto, after the step that decided (it
    # measures the link and waits for the optimizer once).
    skip = AUTO_WARMUP + 1 + baseline if auto else 1
    steady = times[skip:] or times[-1:]
    own = {}
    if auto and len(times) > AUTO_WARMUP:
        # Its own baseline: the step auto measured while recomputing every block (with the
        # leases its choice grew, where it grew them). Where it grew them, the decision's own
        # figure for that pass: the pass's wall time here also holds the decision, which maps
        # and pins the new leases (75.7 s of a 127.9 s pass at 128K on the H100).
        grown = acts.measure.decision.recompute_measured_s if baseline and acts.measure.decision else None
        own = {"recompute_measured_s": grown or times[AUTO_WARMUP - 1 + baseline]}
    return {
        **head,
        **own,
        "result": "ok",
        "step_s": sorted(steady)[len(steady) // 2],
        "steps": times,
        "host_GiB": host,
        "loss": loss_value,
        **_peaks(cuda),
        "offload_saved": placement["offload_saved"] if not auto else "auto",
        **_choice(acts),
        **_staging(acts),
        **_lanes(tracer, name, seq),
    }


def _host_now(acts: Any) -> dict[str, float]:
    """Host memory now, GiB: the process's resident set, the host's available memory, and what
    each activation pool has mapped (the boundary states' staging or tier, the kept graphs, the
    kept attention outputs)."""
    import psutil

    out = {
        "rss": psutil.Process().memory_info().rss / 2**30,
        "available": psutil.virtual_memory().available / 2**30,
    }
    kept = {"saved": getattr(acts.saved, "_host", None), "attention": getattr(acts.attention, "_host", None)}
    stores = {"boundary": acts.boundary, **{k: None if v is None else v.made for k, v in kept.items()}}
    for name, store in stores.items():
        pool = getattr(store, "pool", None)
        if pool is not None and not pool.closed:
            out[name] = pool.stats().reserved / 2**30
    return out


def _lanes(tracer: Any, name: str, seq: int) -> dict[str, Any]:
    """With --trace: per step of this run, its wall seconds and each lane's busy seconds in it."""
    if not tracer.enabled:
        return {}
    rows = []
    for s in tracer.events():
        a = s.get("args", {})
        if s["name"] != "step" or a.get("placement") != name or a.get("seq") != seq:
            continue
        busy = tracer.summary(s["ts"], s["ts"] + s["dur"])
        busy.pop("host", None)  # the step spans themselves, and host waits
        rows.append({"step": a["step"], "wall_s": s["dur"] / 1e6, **{f"{k}_s": v for k, v in busy.items()}})
    return {"trace_steps": rows}


def _peaks(cuda: bool) -> dict[str, float | None]:
    import torch

    if not cuda:
        return {"peak_gpu_GiB": None}
    stats = torch.cuda.memory_stats()
    return {
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_GiB": torch.cuda.max_memory_reserved() / 2**30,
        # Frees of the whole cache and retries (each synchronizes the device), and cudaMallocs:
        # a step near the device's limit pays for these outside any model of it.
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "device_mallocs": stats.get("num_device_alloc", 0),
    }


def _staging(acts: Any) -> dict[str, Any]:
    """How the NVMe store's staging leases grew (nvme boundary states; else nothing)."""
    growth = getattr(acts.boundary, "growth", None)
    return {} if growth is None else {"staging": acts.boundary.staging, "staging_growth": growth}


def _choice(acts: Any) -> dict[str, Any]:
    """auto's decision: per block what it keeps, the estimate, the bound."""
    m = acts.measure
    if m is None or m.decision is None:
        return {}
    d = m.decision
    return {
        "choice": d.describe(),
        "decision": d.to_json(),
        "estimated_step_s": d.step_s,
        "decide_s": m.decide_s,
    }


def planned_device_blocks(
    model: Any, settings: dict[str, Any], a: argparse.Namespace, seq: int, names: list[str], notes: list[str]
) -> dict[str, Any]:
    """--device-blocks as placement settings: the number given, or for auto the plan's
    (offload.plan.make_plan, rates measured here) at seq tokens with the first auto placement of
    names (with none, the first placement's boundary states with offload_saved auto: a recompute
    row gets the count its auto row gets, run alone), with the residents where that plan put them
    (device_blocks auto puts them on the device; a number of 0 alone would leave them on the
    host, whose update the next forward then waits for)."""
    if a.device_blocks != "auto":
        return {"device_blocks": int(a.device_blocks)}
    from offload.config import load_config
    from offload.plan import make_plan

    blocks = model.config.num_hidden_layers
    auto = next(
        (PLACEMENTS[n](blocks) for n in names if PLACEMENTS[n](blocks)["offload_saved"] == "auto"), None
    )
    first = {**PLACEMENTS[names[0]](blocks), "offload_saved": "auto"}
    placement = {**(auto or first), "device_blocks": "auto"}
    cfg = load_config(None, placement=placement, **settings)
    plan = make_plan(model, cfg, batch_size=a.batch, seq_len=seq, detect=True, loss_chunk=a.loss_chunk)
    print(
        f"device_blocks auto: {plan.device_blocks} (the plan at {seq} tokens, {placement['activations']} "
        f"boundary states); " + (plan.recompute.describe() if plan.recompute else "no keep choice"),
        flush=True,
    )
    for note in plan.notes:
        if note.startswith(("device_blocks", "offload_saved: measured")):
            print(f"  note: {note}", flush=True)
            notes.append(note)  # the machine's measured link, disk and compute rates among them
    return {"device_blocks": plan.device_blocks, "device_residents": plan.residents_on_device}


def table(results: list[dict[str, Any]], seqs: list[int], names: list[str]) -> str:
    lines = [f"{'placement':<19}" + "".join(f"{s:>22}" for s in seqs)]
    for name in names:
        cells = []
        for s in seqs:
            r = next(r for r in results if r["placement"] == name and r["seq"] == s)
            if r["result"] != "ok":
                cells.append(f"{r['result']:>22}")
                continue
            peak = "-" if r["peak_gpu_GiB"] is None else f"{r['peak_gpu_GiB']:.1f} GiB"
            cells.append(f"{r['step_s']:>9.3f} s {peak:>10}")
        lines.append(f"{name:<19}" + "".join(cells))
    for r in results:
        if "choice" in r:
            keep = "".join(k[0].upper() if k != "attention_host" else "a" for k in r["decision"]["keep"])
            lines.append(f"{r['placement']} @ {r['seq']}: {keep}  {r['choice']}")
            if r.get("recompute_measured_s") and r["result"] == "ok":
                base, kept = r["recompute_measured_s"], r["step_s"]
                lines.append(
                    f"  its own recompute step {base:.3f} s, then {kept:.3f} s: {1 - kept / base:.1%} faster"
                )
    for r in results:
        for note in r.get("staging_growth", []):
            lines.append(f"{r['placement']} @ {r['seq']}: {note}")
    if any("choice" in r for r in results):
        lines.append(
            "(per block: D device graph, H host graph, A attention on device, a on host, R recompute)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqs", default="2048,8192,16384,32768")
    ap.add_argument("--placements", default="recompute,auto")
    ap.add_argument("--steps", type=int, default=3, help="steps timed per run (auto runs 2 more first)")
    ap.add_argument(
        "--device-blocks",
        default="0",
        help="blocks whose state stays on the device, or auto: the plan's count for the longest "
        "sequence with offload_saved auto (fewer where their memory pays more as keeps)",
    )
    ap.add_argument(
        "--loss-chunk", type=int, default=None, help="train.loss_chunk (default: the model's loss)"
    )
    ap.add_argument("--nvme-dir", default="/tmp/offload-act")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--trace", default=None, help="write the runtime's Chrome trace here; rows get trace_steps"
    )
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
    settings = {
        "device": a.device,
        "dtype": "bfloat16" if a.device.startswith("cuda") else "float32",
        "optimizer": {"lr": 1e-5, "overlap_backward": True},
        "nvme_dirs": [a.nvme_dir],
        "trace": a.trace,
    }
    Path(a.nvme_dir).mkdir(parents=True, exist_ok=True)  # the plan probes the disk there
    notes: list[str] = []
    blocks = planned_device_blocks(model, settings, a, max(seqs), names, notes)
    model, opt = offload.wrap(model, init="random", placement=blocks, **settings)
    print(f"wrapped in {time.perf_counter() - t0:.0f} s", flush=True)
    results: list[dict[str, Any]] = []
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "date": date.today().isoformat(),
        "device": device,
        "host": platform.node(),
        "size": a.size,
        "batch": a.batch,
        "args": vars(a),
        **blocks,
        "plan_notes": notes,
        "results": results,
    }
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"activations_{a.size}_{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for seq in seqs:
        for name in names:
            r = run_one(model, opt, a, seq, name)
            print(
                json.dumps({k: v for k, v in r.items() if k not in ("steps", "decision", "trace_steps")}),
                flush=True,
            )
            for row in r.get("trace_steps", []):
                print(
                    "  trace "
                    + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                )
            results.append(r)
            out.write_text(json.dumps(report, indent=1, default=str))  # each row as it comes
            first = results[0].get("start_allocated_GiB")
            if first is not None and r["start_allocated_GiB"] > first + LEFTOVER_GIB:
                print(
                    f"warning: {name} @ {seq} started with {r['start_allocated_GiB']:.2f} GiB allocated, "
                    f"the first run with {first:.2f}: an earlier run left tensors behind",
                    flush=True,
                )
    model.runtime.close()
    print()
    print(table(results, seqs, names))
    out.write_text(json.dumps(report, indent=1, default=str))
    print("written", out)


if __name__ == "__main__":
    main()
