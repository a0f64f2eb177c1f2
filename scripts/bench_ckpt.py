"""What asynchronous checkpoints cost a training run, against the disk and against torch DCP.

    python scripts/bench_ckpt.py --size 3b --steps 4 --dir /tmp/ckpt-bench --out results.json

Trains the Llama shape of scripts/bench_train.py (3b: 3.4B, batch 4 x 2048, bf16 on CUDA,
``placement.device_blocks=12``, ``overlap_backward`` on) and measures, in one process:

1. the disk: a plain large O_DIRECT write through offload.io (fsync included), GB/s;
2. N steps without checkpoints, then N steps calling ``offload.save`` after every step: step
   times, the stall each save reports (``SaveStats.stall_s``: save() blocking plus the optimizer
   waiting in the capture fence; a save() also waits for the save before it), and the writer's
   flush throughput (bytes / writer time) next to the disk's;
3. ``torch.distributed.checkpoint.async_save`` of the same tensors (fp32 master, exp_avg,
   exp_avg_sq of every parameter; a gloo group of one process): how long the call blocks, and
   bytes over the time to its future's result, with training steps running meanwhile.

Only one checkpoint is kept on disk at a time (the previous committed one is deleted as soon as
the next save() returns), so the disk needs about one checkpoint's size free (checked first).
Prints a table and writes JSON (--out). On the CPU ``--size tiny`` runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import llama_config, train_step  # noqa: E402

DEFAULTS = {  # size -> (batch, seq) when not given: 4 x 2048 as bench_train, smaller on the CPU
    "cuda": (4, 2048),
    "cpu": (2, 128),
}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    cuda = torch.cuda.is_available() and not a.cpu
    batch, seq = (
        a.batch or DEFAULTS["cuda" if cuda else "cpu"][0],
        a.seq or DEFAULTS["cuda" if cuda else "cpu"][1],
    )
    a.dir.mkdir(parents=True, exist_ok=True)
    meta = meta_model(a.size, seq)
    nparams = sum(p.numel() for p in meta.parameters())
    state_bytes = 12 * nparams  # fp32 master, exp_avg, exp_avg_sq
    need = int(1.1 * state_bytes) + a.disk_bytes
    free = shutil.disk_usage(a.dir).free
    if free < need:
        print(f"bench_ckpt: {a.dir} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    model, opt = wrap(a, meta, cuda, nparams)
    disk = disk_write_gbps(a.dir, a.disk_bytes)
    print(f"disk: O_DIRECT write {disk:.2f} GB/s", flush=True)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda" if cuda else "cpu")
    for _ in range(a.warmup):
        train_step(model, opt, x, cuda)
    plain = [train_step(model, opt, x, cuda)[0] for _ in range(a.steps)]
    ours = run_saves(a, model, opt, x, cuda)
    shutil.rmtree(a.dir / "offload", ignore_errors=True)
    dcp = run_dcp(a, model, opt, x, cuda) if not a.no_dcp else None
    report = summarize(a, cuda, batch, seq, nparams, state_bytes, disk, plain, ours, dcp)
    print(render(report))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))
        print("written", a.out)
    model.runtime.close()
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3b", choices=["tiny", "1b", "3b"])
    ap.add_argument("--steps", type=int, default=4, help="steps without, then with, checkpoints")
    ap.add_argument("--save-every", type=int, default=1, help="save after every this many steps (default 1)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offload-ckpt-bench"), help="checkpoints go here")
    ap.add_argument("--device-blocks", type=int, default=None, help="default: 12 on CUDA, 1 on the CPU")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--staging-gib", type=float, default=None, help="staging ring (default: 2 records)")
    ap.add_argument("--disk-gib", type=float, default=None, help="disk probe size (default 4, tiny 0.25)")
    ap.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint.async_save")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    ap.add_argument("--out", default=None, help="JSON results path")
    a = ap.parse_args(argv)
    a.disk_bytes = int((a.disk_gib or (0.25 if a.size == "tiny" else 4)) * 2**30) // 4096 * 4096
    return a


def meta_model(size: str, seq: int) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(size, seq))


def wrap(a: argparse.Namespace, model: Any, cuda: bool, nparams: int) -> tuple[Any, Any]:
    import offload

    t0 = time.perf_counter()
    blocks = a.device_blocks if a.device_blocks is not None else (12 if cuda else 1)
    model, opt = offload.wrap(
        model,
        init="random",
        device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32",
        placement={"device_blocks": blocks},
        optimizer={"lr": 1e-5, "overlap_backward": True},
    )
    print(
        f"{a.size}: {nparams / 1e9:.2f}B params, device_blocks={blocks}, wrap {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return model, opt


def run_saves(a: argparse.Namespace, model: Any, opt: Any, x: Any, cuda: bool) -> dict[str, Any]:
    """N steps, a save after every --save-every of them (the save() call inside the step's time)."""
    import offload

    root = a.dir / "offload"
    shutil.rmtree(root, ignore_errors=True)
    staging = int(a.staging_gib * 2**30) if a.staging_gib else None
    # Untimed: the first save maps and pins the staging ring, once per run.
    shutil.rmtree(offload.save(model, opt, root, step=0, staging_bytes=staging).wait())
    times, handles = [], []
    for step in range(1, a.steps + 1):
        saving = step % a.save_every == 0

        def save(step: int = step) -> None:
            handles.append(offload.save(model, opt, root, step=step, staging_bytes=staging))

        times.append(train_step(model, opt, x, cuda, save if saving else None)[0])
        if saving and len(handles) > 1:  # save() waited for it: committed; keep one on disk
            shutil.rmtree(handles[-2].wait(), ignore_errors=True)
        print(f"step {step} {times[-1]:.3f} s{' (save)' if saving else ''}", flush=True)
    t = time.perf_counter()
    handles[-1].wait()
    tail = time.perf_counter() - t
    stats = [h.stats for h in handles]
    for s in stats:
        print(
            f"  save {s.step}: {s.bytes / 1e9:.2f} GB, write {s.write_s:.2f} s ({s.gbps:.2f} GB/s), call "
            f"{s.call_s:.3f} s (waiting for the one before {s.waited_s:.3f} s), hold {s.hold_s:.3f} s, "
            f"device copy {s.device_copy}",
            flush=True,
        )
    return {"step_s": times, "stats": [stat_dict(s) for s in stats], "last_wait_s": tail}


def stat_dict(s: Any) -> dict[str, Any]:
    return {
        "step": s.step,
        "bytes": s.bytes,
        "write_s": s.write_s,
        "GBps": s.gbps,
        "call_s": s.call_s,
        "waited_s": s.waited_s,
        "hold_s": s.hold_s,
        "stall_s": s.stall_s,
        "device_copy": s.device_copy,
    }


def run_dcp(a: argparse.Namespace, model: Any, opt: Any, x: Any, cuda: bool) -> dict[str, Any]:
    """torch.distributed.checkpoint.async_save of the same tensors, steps running meanwhile."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    sd = dcp_state(model)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    if not dist.is_initialized():  # one process: DCP's plan exchange runs on gloo (CPU objects)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    path = a.dir / "dcp"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    fut = dcp.async_save(sd, checkpoint_id=str(path))
    call_s = time.perf_counter() - t0
    times = []
    while not fut.done() and len(times) < a.steps:
        times.append(train_step(model, opt, x, cuda)[0])
    fut.result()
    total_s = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    dist.destroy_process_group()
    print(f"dcp async_save: call {call_s:.3f} s, total {total_s:.2f} s ({written / total_s / 1e9:.2f} GB/s)")
    return {"bytes": nbytes, "written": written, "call_s": call_s, "total_s": total_s, "step_s": times}


def dcp_state(model: Any) -> dict[str, Any]:
    """master, exp_avg and exp_avg_sq of every parameter, as views of the store (device records'
    stay on the device: DCP stages them to the host itself)."""
    from offload.checkpoint import state

    rt = model.runtime
    rt.wait_updates()
    sd = {}
    for rec, refs in state.params_of(rt):
        if rec.exp_avg is None or rec.exp_avg_sq is None:
            raise SystemExit("bench_ckpt: the DCP side needs optimizer state in memory (host tier)")
        for ref in refs:
            for kind, flat in (
                ("master", rec.master),
                ("exp_avg", rec.exp_avg),
                ("exp_avg_sq", rec.exp_avg_sq),
            ):
                sd[f"{kind}/{ref.names[0]}"] = ref.view(flat)
    return sd


def disk_write_gbps(d: Path, nbytes: int, repeat: int = 2) -> float:
    """A plain large O_DIRECT write of random bytes through offload.io, fsync included (median)."""
    import numpy as np

    import offload.io as oio
    from offload.memory import PinnedPool

    path = d / f".disk-probe-{os.getpid()}.bin"
    out = []
    with (
        PinnedPool(nbytes, arena_bytes=nbytes, pin=False, name="disk-probe") as pool,
        oio.Engine() as engine,
        pool.lease(nbytes, purpose="probe") as buf,
    ):
        view = buf.tensor.numpy()
        step = 64 << 20
        rng = np.random.default_rng(0)
        for i in range(0, nbytes, step):
            view[i : i + step] = np.frombuffer(rng.bytes(min(step, nbytes - i)), dtype=np.uint8)
        for _ in range(repeat):
            path.unlink(missing_ok=True)
            with oio.open(path, "w", engine=engine) as f:
                t = time.perf_counter()
                f.write_from(buf).wait()
                f.sync()
                out.append(nbytes / (time.perf_counter() - t) / 1e9)
    path.unlink(missing_ok=True)
    return statistics.median(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarize(
    a: argparse.Namespace,
    cuda: bool,
    batch: int,
    seq: int,
    nparams: int,
    state_bytes: int,
    disk: float,
    plain: list[float],
    ours: dict[str, Any],
    dcp: dict[str, Any] | None,
) -> dict[str, Any]:
    import torch

    base = statistics.mean(plain)
    stats = ours["stats"]
    with_save = statistics.mean(ours["step_s"])
    stall = sum(s["stall_s"] for s in stats) / len(ours["step_s"])  # per step, saving or not
    gbps = statistics.median(s["GBps"] for s in stats)
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "host": platform.node(),
        "size": a.size,
        "save_every": a.save_every,
        "params_B": nparams / 1e9,
        "batch": batch,
        "seq": seq,
        "checkpoint_GB": stats[0]["bytes"] / 1e9,
        "state_GB": state_bytes / 1e9,
        "disk_write_GBps": disk,
        "step_s": base,
        "step_s_with_save": with_save,
        "stall_s_per_step": stall,
        "stall_pct": 100 * stall / base,
        "flush_GBps": gbps,
        "flush_over_disk": gbps / disk,
        "plain_steps": plain,
        "offload": ours,
    }
    if dcp is not None:
        report["dcp"] = {
            **dcp,
            "stall_pct": 100 * dcp["call_s"] / base,
            "GBps": dcp["written"] / dcp["total_s"] / 1e9,
        }
    return report


def render(r: dict[str, Any]) -> str:
    lines = [
        f"\n{r['size']} ({r['params_B']:.2f}B params, checkpoint {r['checkpoint_GB']:.1f} GB) on {r['device']}, "
        f"batch {r['batch']} x {r['seq']}; disk O_DIRECT write {r['disk_write_GBps']:.2f} GB/s",
        f"{'':<22} {'step s':>8} {'stall s':>8} {'stall %':>8} {'GB/s':>7} {'/disk':>6}",
        f"{'no checkpoint':<22} {r['step_s']:>8.3f}",
        f"{'offload.save every ' + str(r['save_every']):<22} {r['step_s_with_save']:>8.3f} {r['stall_s_per_step']:>8.3f} "
        f"{r['stall_pct']:>8.1f} {r['flush_GBps']:>7.2f} {r['flush_over_disk']:>6.2f}",
    ]
    d = r.get("dcp")
    if d:
        step = statistics.mean(d["step_s"]) if d["step_s"] else float("nan")
        lines.append(
            f"{'dcp.async_save once':<22} {step:>8.3f} {d['call_s']:>8.3f} {d['stall_pct']:>8.1f} "
            f"{d['GBps']:>7.2f} {d['GBps'] / r['disk_write_GBps']:>6.2f}"
        )
    lines.append(
        "step s: mean. stall per step: offload = save() calls + optimizer held by the capture fence, summed "
        "over the saves / steps; dcp = the async_save call. GB/s: bytes / writer time (offload, median per "
        "save), bytes / time to the future's result (dcp)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
