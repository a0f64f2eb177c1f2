"""Training throughput, side by side on one machine: offload vs DeepSpeed ZeRO-3 CPU offload vs
everything on the GPU, same Llama shape, same batch (default 4 x 2048 tokens).

    python scripts/bench_train.py --size 3b --systems offload,gpu,deepspeed --out results.json

offload runs in this process; the baselines run as subprocesses of the scripts in
../shared/baselines (copied to .bench/ for the GPU machine, see its README), each in its own
process so host and device memory are measured separately. Prints a table and writes JSON.

Under torchrun (``torchrun --nproc-per-node 2 scripts/bench_train.py --systems offload ...``)
offload runs data-parallel with its store sharded over the ranks: each rank trains on its own
batch of --batch x --seq tokens, tokens/s counts all ranks, host memory sums over the ranks,
and rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, layers, heads (the baselines' shapes)
    "tiny": (256, 688, 4, 8),
    "1b": (2048, 5504, 24, 16),
    "3b": (3200, 8640, 26, 32),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
}


def llama_config(size: str, seq: int):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    h, inter, layers, heads = SHAPES[size]
    return LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=seq,
    )


def per_rank(value: float, world: int) -> list[float]:
    """value from every rank, in rank order."""
    if world == 1:
        return [value]
    import torch
    import torch.distributed as dist

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    parts = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([value], dtype=torch.float64, device=dev))
    return [float(p.item()) for p in parts]


def train_step(
    model: Any, opt: Any, x: Any, cuda: bool, after: Callable[[], None] | None = None
) -> tuple[float, float]:
    """One step's wall time and loss, the device drained at both ends (the optimizer's worker runs on);
    after: called at the step boundary, inside the timed span (a save)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if after is not None:
        after()
    value = loss.item()  # syncs the device; the optimizer's updates run on
    return time.perf_counter() - t, value


def run_offload(a: argparse.Namespace) -> dict:
    import psutil
    import torch
    from transformers import LlamaForCausalLM

    import offload
    from offload.train.ranks import join

    ranks = join(a.device)  # torchrun's process group (NCCL, or gloo for a CPU check run)
    rank, world = ranks.rank, ranks.world
    cuda = a.device == "cuda"
    rates = disk_rates(a.nvme_dir) if a.nvme_dir and rank == 0 else None
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(a.size, a.seq))
    nparams = sum(p.numel() for p in model.parameters())
    from offload.config import load_config
    from offload.plan import account, make_plan

    cfg = load_config(
        None,
        device=a.device,
        dtype="bfloat16",
        slots=a.slots,
        placement={
            "device_blocks": a.device_blocks,
            "optimizer_state": a.optimizer_state,
            "master": a.master,
            "spill_blocks": a.spill_blocks,
        },
        nvme_dirs=[a.nvme_dir] if a.nvme_dir else [],
        budgets={"host_bytes": a.host_bytes, "gpu_bytes": a.gpu_bytes},
        optimizer={"lr": 1e-5, "overlap_backward": bool(a.overlap), "threads": a.adam_threads},
        trace=a.trace,
    )
    # The plan the runtime follows, and what this run is measured against (plan_vs_measured).
    plan = make_plan(model, cfg, batch_size=a.batch, seq_len=a.seq, world_size=world, detect=True)
    if rank == 0:
        print(plan.table(), flush=True)
    model, opt = offload.wrap(model, cfg, init="random", plan=plan)
    init_s = time.perf_counter() - t0
    print(f"offload: {nparams / 1e9:.2f}B params, rank {rank} of {world}, init {init_s:.1f}s", flush=True)
    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    x = torch.randint(0, 32000, (a.batch, a.seq), generator=g).to(a.device)
    times, losses = [], []
    for s in range(a.steps):
        seconds, loss = train_step(model, opt, x, cuda)
        times.append(seconds)
        losses.append(loss)
        if rank == 0:
            print(f"step {s} {times[-1]:.3f}s loss {losses[-1]:.3f}", flush=True)
    rt = model.runtime
    rt.wait_updates()
    steady = times[2:] if len(times) > 3 else times[1:]
    step_s = sorted(steady)[len(steady) // 2]
    tokens = a.batch * a.seq * world
    held = sum(r.state_bytes() for r in rt.records()) + rt.state_tier.stored_bytes()
    state_ranks = per_rank(held, world)
    rss_peaks = per_rank(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, world)
    state, rss_peak = sum(state_ranks), sum(rss_peaks)
    rss_now = sum(per_rank(psutil.Process().memory_info().rss, world))
    out = dict(
        system="offload",
        ranks=world,
        device_blocks=a.device_blocks,
        size=a.size,
        params_B=nparams / 1e9,
        tokens_per_step=tokens,
        step_s=step_s,
        tokens_s=tokens / step_s,
        TFLOPs=8 * nparams * tokens / step_s / 1e12,
        steps=times,
        losses=losses,
        init_s=init_s,
        peak_gpu_GiB=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        rss_GiB=rss_now / 2**30,
        rss_peak_GiB=rss_peak / 2**30,
        state_GiB=state / 2**30,
        rss_over_state=rss_peak / state,
        state_per_rank_GiB=[b / 2**30 for b in state_ranks],
        rss_peak_per_rank_GiB=[b / 2**30 for b in rss_peaks],
        pool=rt.pool.stats().table(),
    )
    out["plan_vs_measured"] = account(plan, rt).to_json()
    out["plan"] = plan.to_json()
    compute_s = None
    if a.trace:
        busy = rt.tracer.summary()
        span = max(e["ts"] + e["dur"] for e in rt.tracer.events()) - min(e["ts"] for e in rt.tracer.events())
        out["trace"] = {
            "path": rt.tracer.write(),
            "busy_s": busy,
            "span_s": span / 1e6,
            "gpu_busy_fraction": busy.get("compute", 0) / (span / 1e6),
        }
        compute_s = busy.get("compute", 0) / len(times) if cuda else None
    if rates is not None and rt.state_tier.stored_bytes():
        mean_s = statistics.mean(times[1:] or times)  # every step after the first
        out["nvme"] = disk_floor(rates, rt.state_tier.stored_bytes(), mean_s, compute_s)
    return out


def disk_rates(directory: str) -> dict:
    """The disk's O_DIRECT read and write bandwidth in the directory the state will live in,
    measured before the model takes the host memory the probe's buffers need."""
    from offload.cli.bench_io import BenchIoConfig, run_bench

    r = run_bench(BenchIoConfig(dir=Path(directory), size=4 << 30, backends=("io_uring",), repeat=1))
    read = max(r["baseline"]["read_GBps"], r["backends"]["io_uring"]["read_GBps"])
    write = max(r["baseline"]["write_GBps"], r["backends"]["io_uring"]["write_GBps"])
    return {"read_GBps": read, "write_GBps": write, "bench_io": r}


def disk_floor(rates: dict, stored: int, step_s: float, compute_s: float | None) -> dict:
    """The step time the disk allows: every step reads and writes back each spilled block's state
    once, so the floor is stored / read bandwidth + stored / write bandwidth (the disk does one
    after the other). Against max(GPU compute, that floor) when the trace gave compute."""
    floor = stored / (rates["read_GBps"] * 1e9) + stored / (rates["write_GBps"] * 1e9)
    bound = max(floor, compute_s or 0.0)
    print(
        f"disk: read {rates['read_GBps']:.2f} GB/s, write {rates['write_GBps']:.2f} GB/s; {stored / 1e9:.1f} GB "
        f"each way per step: floor {floor:.1f} s"
        + (f", GPU compute {compute_s:.1f} s" if compute_s else "")
        + f"; step {step_s:.1f} s = {step_s / bound:.2f}x max(compute, floor)",
        flush=True,
    )
    return {
        **rates,
        "stored_bytes": stored,
        "floor_s": floor,
        "compute_s": compute_s,
        "step_over_floor": step_s / floor,
        "step_over_bound": step_s / bound,
    }


def run_baseline(script: str, args: list[str], outname: str, env: dict) -> dict:
    path = ROOT / ".bench" / script
    if not path.exists():
        return {
            "error": f"{path} missing: copy ../shared/baselines/*.py to .bench/ (see scripts/bench_train.py)"
        }
    outdir = Path(os.environ.get("OUT", "/tmp"))
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=560
    )
    print(proc.stdout[-1500:], proc.stderr[-1500:], flush=True)
    f = outdir / outname
    if proc.returncode != 0 or not f.exists():
        return {"error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-800:]}
    r = json.loads(f.read_text())
    r["wall_s"] = time.perf_counter() - t
    return r


def _blocks(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument(
        "--overlap", type=int, default=1, help="update blocks during backward (1) or at step() (0)"
    )
    ap.add_argument(
        "--adam-threads", type=int, default=None, help="CPU optimizer threads (default: cores - 2)"
    )
    ap.add_argument(
        "--device-blocks", type=_blocks, default=0, help="blocks whose state stays on the GPU, or auto"
    )
    ap.add_argument(
        "--spill-blocks", type=int, default=None, help="placement.spill_blocks (null: from budgets)"
    )
    ap.add_argument("--master", default="host", choices=["host", "nvme", "auto"], help="placement.master")
    ap.add_argument("--host-bytes", default=None, help="budgets.host_bytes, e.g. 120GiB")
    ap.add_argument("--gpu-bytes", default=None, help="budgets.gpu_bytes, e.g. 74GiB")
    ap.add_argument(
        "--optimizer-state", default="host", choices=["host", "nvme", "auto"], help="where Adam m and v live"
    )
    ap.add_argument("--nvme-dir", default=None, help="directory for --optimizer-state nvme")
    ap.add_argument("--systems", default="offload,gpu,deepspeed")
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a check run of the script"
    )
    ap.add_argument("--trace", default=None, help="Chrome-trace JSON path for the offload run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    systems = a.systems.split(",")
    results: dict[str, dict] = {}
    env = dict(os.environ)
    if "gpu" in systems:
        results["gpu"] = run_baseline(
            "gpu_baseline.py",
            ["--size", a.size, "--mb", str(a.batch), "--seq", str(a.seq)],
            f"gpu_{a.size}.json",
            env,
        )
    if "deepspeed" in systems:
        results["deepspeed"] = run_baseline(
            "ds_baseline.py",
            ["--size", a.size, "--offload", "cpu", "--steps", "4", "--mb", str(a.batch), "--seq", str(a.seq)],
            f"ds_{a.size}_cpu_None.json",
            env,
        )
    if "offload" in systems:
        results["offload"] = run_offload(a)
        if results["offload"]["ranks"] > 1:
            import torch.distributed as dist

            rank = dist.get_rank()
            dist.destroy_process_group()
            if rank != 0:
                return
    import torch

    report = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "host": platform.node(),
        "size": a.size,
        "batch": a.batch,
        "seq": a.seq,
        "results": results,
        "ratios": {},
    }
    ours = results.get("offload", {}).get("tokens_s")
    for name in ("gpu", "deepspeed"):
        theirs = results.get(name, {}).get("tokens_s")
        if ours and theirs:
            report["ratios"][f"offload/{name}"] = ours / theirs
    print(f"\n{'system':<10} {'step s':>8} {'tokens/s':>10} {'TFLOPS':>8} {'host GiB':>9} {'GPU GiB':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<10} {r['error']}")
            continue
        host = r.get("rss_peak_GiB", r.get("rss_GiB", float("nan")))
        print(
            f"{name:<10} {r['step_s']:>8.3f} {r['tokens_s']:>10,.0f} {r['TFLOPs']:>8.1f} {host:>9.1f} "
            f"{r['peak_gpu_GiB']:>8.1f}"
        )
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}x")
    out = a.out or str(
        ROOT
        / "benchmarks"
        / "results"
        / f"train_{a.size}_{report['date']}_{report['device'].replace(' ', '-')}.json"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    print("written", out)


if __name__ == "__main__":
    main()
