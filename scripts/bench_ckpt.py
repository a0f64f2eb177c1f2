"""What asynchronous checkpoints cost a training run, against the disk and against torch DCP.

    python scripts/bench_ckpt.py --size 3b --steps 4 --accumulate 40 --staging-gib host --out a.json
    python scripts/bench_ckpt.py --size 3b --steps 96 --save-every 32 --staging-gib host --out b.json

Trains the Llama shape of scripts/bench_train.py (3b: 3.4B, micro-batch 4 x 2048, bf16 on CUDA,
``placement.device_blocks=12``; ``overlap_backward`` on unless --accumulate > 1, which needs it
off) and measures, in one process:

1. the disk, written the way the saves write: offload.io with O_DIRECT, 64 MiB chunks, four in
   flight, fsync included, two ways: *fresh* (a new fallocated file, after the deletion before it
   has settled: sync + 3 s) and *overwrite* (over the blocks of an existing file, which is what a
   save with ``prune="before"`` writes on). Median of two each.
2. the writer alone, no training running: save 0 (fresh files; it also maps and pins the staging
   ring, so it is not one of the timed saves) and, with --prune before, save 1 written over it.
3. N steps without checkpoints, then N steps with ``offload.save`` after every --save-every of
   them, never after the last (each save's cost lands inside the measured steps), keeping one
   checkpoint on disk as --prune says: ``before``: offload's ``keep_last=1, prune="before"`` (the
   save writes over the previous checkpoint's files; the disk holds one checkpoint); ``after``:
   ``keep_last=1`` (pruned after the commit; the disk holds two at the peak); ``concurrent``: the
   bench deletes the previous checkpoint on a thread as soon as the next save() returns, as a
   user's cleanup would. Per step: its time and its excess over the mean step without saves; per
   save: what ``SaveStats`` measured, its flush GB/s and the ratio to the disk written the same way.
4. ``torch.distributed.checkpoint.async_save`` of the same tensors (fp32 master, exp_avg,
   exp_avg_sq of every parameter; a gloo group of one process): how long the call blocks, and
   bytes over the time to its future's result, with training steps running meanwhile.

--staging-gib sets the staging ring: a size, ``host`` (every host record's file at once: capture
never waits for the disk) or ``state`` (the whole checkpoint). --trace PATH writes the run's
timeline (Chrome trace): the writer's spans are in the ``io`` lane (``checkpoint`` per record,
``recycle``, ``commit``, ``prune``), the optimizer's waits for capture in ``optimizer``
(``wait_capture``). Prints a table and writes JSON (--out). On the CPU ``--size tiny`` runs in
well under a minute.
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
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import llama_config  # noqa: E402

DEFAULTS = {"cuda": (4, 2048), "cpu": (2, 128)}  # (batch, seq) when not given
PRUNE = ("before", "after", "concurrent")
PROBE_CHUNK = 64 << 20  # as the staging ring's chunks
SETTLE_S = 3.0  # after a sync, before a fresh write: the discards of a deletion land first


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    from offload.checkpoint.writer import drain

    cuda = torch.cuda.is_available() and not a.cpu
    batch, seq = (
        a.batch or DEFAULTS["cuda" if cuda else "cpu"][0],
        a.seq or DEFAULTS["cuda" if cuda else "cpu"][1],
    )
    a.dir.mkdir(parents=True, exist_ok=True)
    meta = meta_model(a.size, seq, a.layers)
    nparams = sum(p.numel() for p in meta.parameters())
    state_bytes = 12 * nparams  # fp32 master, exp_avg, exp_avg_sq
    need = int((2.1 if a.prune == "after" else 1.1) * state_bytes) + a.disk_bytes
    free = shutil.disk_usage(a.dir).free
    if free < need:
        print(f"bench_ckpt: {a.dir} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    model, opt = wrap(a, meta, cuda, nparams)
    try:
        staging = staging_bytes(a.staging_gib, model)
    except ValueError as e:
        model.runtime.close()
        print(f"bench_ckpt: {e}", file=sys.stderr)
        return 2
    disk = disk_probe(a.dir, a.disk_bytes)
    cpu = cpu_probe(1 << (26 if a.size == "tiny" else 30))
    print("cpu: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()), flush=True)
    print(
        f"disk: O_DIRECT {disk['fresh_GBps']:.2f} GB/s fresh, {disk['overwrite_GBps']:.2f} GB/s overwrite",
        flush=True,
    )
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda" if cuda else "cpu")

    def step(after: Callable[[], None] | None = None) -> float:
        return train_step(model, opt, x, cuda, a.accumulate, after)[0]

    for _ in range(a.warmup):
        step()
    plain = [step() for _ in range(a.steps if a.plain is None else a.plain)]
    ours = run_saves(a, model, opt, step, staging)
    shutil.rmtree(a.dir / "offload", ignore_errors=True)
    drain(model.runtime, release=True)  # DCP stages its own copy of the state: free our ring first
    if not a.no_dcp:  # ours first, in case the comparison does not finish (a time limit)
        write(
            a.out,
            {
                **summarize(a, cuda, batch, seq, nparams, state_bytes, staging, disk, plain, ours, None),
                "cpu": cpu,
            },
        )
    dcp = run_dcp(a, model, step) if not a.no_dcp else None
    report = summarize(a, cuda, batch, seq, nparams, state_bytes, staging, disk, plain, ours, dcp)
    report["cpu"] = cpu
    print(render(report))
    if a.trace:
        print("trace", model.runtime.tracer.write(a.trace))
    if write(a.out, report):
        print("written", a.out)
    model.runtime.close()
    return 0


def write(out: str | None, report: dict[str, Any]) -> bool:
    """Writes report as JSON to out (when given)."""
    if not out:
        return False
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3b", choices=["tiny", "1b", "3b"])
    ap.add_argument("--layers", type=int, default=None, help="fewer (or more) blocks than the size has")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps without, then with, checkpoints")
    ap.add_argument(
        "--plain", type=int, default=None, help="steps without checkpoints first (default: --steps)"
    )
    ap.add_argument("--save-every", type=int, default=1, help="save after every this many steps (default 1)")
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument(
        "--prune", default="before", choices=PRUNE, help="how one checkpoint is kept (default before)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offload-ckpt-bench"), help="checkpoints go here")
    ap.add_argument("--device-blocks", type=int, default=None, help="default: 12 on CUDA, 1 on the CPU")
    ap.add_argument(
        "--gradients",
        default="host",
        choices=["host", "gpu"],
        help="placement.gradients: where the micro-batches' fp32 sums are made (default host)",
    )
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--staging-gib", default=None, help="GiB, 'host' or 'state' (default: 2 records)")
    ap.add_argument("--disk-gib", type=float, default=None, help="disk probe size (default 4, tiny 0.25)")
    ap.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint.async_save")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    ap.add_argument("--trace", default=None, help="write the run's timeline (Chrome trace JSON) here")
    ap.add_argument("--out", default=None, help="JSON results path")
    a = ap.parse_args(argv)
    if a.accumulate < 1 or a.save_every < 1 or a.steps <= a.save_every:
        ap.error("--accumulate and --save-every must be >= 1, and --steps more than --save-every")
    if a.plain is not None and a.plain < 1:
        ap.error("--plain must be >= 1")
    a.disk_bytes = int((a.disk_gib or (0.25 if a.size == "tiny" else 4)) * 2**30) // 4096 * 4096
    return a


def meta_model(size: str, seq: int, layers: int | None) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(size, seq)
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def wrap(a: argparse.Namespace, model: Any, cuda: bool, nparams: int) -> tuple[Any, Any]:
    import offload

    t0 = time.perf_counter()
    blocks = a.device_blocks if a.device_blocks is not None else (12 if cuda else 1)
    model, opt = offload.wrap(
        model,
        init="random",
        device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32",
        placement={"device_blocks": blocks, "gradients": a.gradients},
        optimizer={"lr": 1e-5, "overlap_backward": a.accumulate == 1},
        trace=a.trace,
    )
    print(
        f"{a.size}: {nparams / 1e9:.2f}B params, device_blocks={blocks}, accumulate {a.accumulate}, "
        f"gradient sums on {a.gradients}, "
        f"wrap {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return model, opt


def train_step(
    model: Any, opt: Any, x: Any, cuda: bool, accumulate: int, after: Callable[[], None] | None = None
) -> tuple[float, float]:
    """One optimizer step over accumulate micro-batches: its wall time (the device drained at both
    ends; the optimizer's worker runs on) and the last loss. after: called at the step boundary,
    inside the timed span (a save)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(accumulate):
        loss = model(input_ids=x, labels=x).loss
        (loss / accumulate if accumulate > 1 else loss).backward()
    opt.step()
    opt.zero_grad()
    if after is not None:
        after()
    value = loss.item()  # syncs the device
    return time.perf_counter() - t, value


def staging_bytes(spec: str | None, model: Any) -> int | None:
    """--staging-gib: None (the default ring), GiB, "host" (every host record's file, in whole
    chunks) or "state" (the whole checkpoint); refused when host memory cannot hold it."""
    import psutil

    from offload.checkpoint import state
    from offload.checkpoint.job import plan_record
    from offload.checkpoint.staging import chunk_size

    if spec is None:
        return None
    plans = [plan_record(rec, refs) for rec, refs in state.params_of(model.runtime)]
    chunk = chunk_size(max(p.nbytes for p in plans))
    if spec in ("host", "state"):
        files = [p.nbytes for p in plans if spec == "state" or not p.rec.on_device]
        nbytes = sum(-(-n // chunk) for n in files) * chunk
    else:
        try:
            nbytes = int(float(spec) * 2**30)
        except ValueError:
            raise ValueError(f"--staging-gib {spec!r}: a number of GiB, 'host' or 'state'") from None
    avail = psutil.virtual_memory().available
    if nbytes + (2 << 30) > avail:
        raise ValueError(
            f"a {nbytes / 2**30:.1f} GiB staging ring does not fit the {avail / 2**30:.1f} GiB of host "
            "memory available (2 GiB kept free)"
        )
    return nbytes


def run_saves(
    a: argparse.Namespace, model: Any, opt: Any, step: Callable[..., float], staging: int | None
) -> dict[str, Any]:
    """The writer alone (untimed), then the timed steps with a save after every --save-every."""
    import offload

    root = a.dir / "offload"
    shutil.rmtree(root, ignore_errors=True)
    keep = {"keep_last": 1, "prune": a.prune} if a.prune != "concurrent" else {}

    def save(n: int) -> Any:
        return offload.save(model, opt, root, step=n, staging_bytes=staging, **keep)

    idle = [save(0)]  # maps and pins the staging ring: not one of the timed saves
    idle[0].wait()
    if a.prune == "before":
        idle.append(save(1))  # written over save 0's files, still with no training running
        idle[1].wait()
    for h in idle:
        report_save("writer alone", h.stats)
    deleter = Deleter()
    times, saved, handles, after_step = [], [], [], []
    for i in range(1, a.steps + 1):
        saving = i % a.save_every == 0 and i < a.steps  # the last step's save would land in no step

        def after(i: int = i) -> None:
            handles.append(save(len(idle) - 1 + i))

        times.append(step(after if saving else None))
        saved.append(saving)
        if saving:
            after_step.append(i)
        if saving and a.prune == "concurrent":
            before = handles[-2] if len(handles) > 1 else idle[-1]
            deleter.delete(before.wait())  # save() waited for it: committed; keep one on disk
        print(f"step {i} {times[-1]:.3f} s{' (save)' if saving else ''}", flush=True)
    t = time.perf_counter()
    handles[-1].wait()
    tail = time.perf_counter() - t
    deleter.join()
    for h in handles:
        report_save("save", h.stats)
    return {
        "step_s": times,
        "saved": saved,
        "idle": [stat_dict(h.stats) for h in idle],
        "stats": [{**stat_dict(h.stats), "after_step": i} for h, i in zip(handles, after_step)],
        "last_wait_s": tail,
        "delete_s": deleter.seconds,
    }


class Deleter:
    """--prune concurrent: deletes a committed checkpoint on a thread, one at a time."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.seconds: list[float] = []

    def delete(self, path: Path) -> None:
        self.join()

        def run() -> None:
            t = time.perf_counter()
            shutil.rmtree(path)
            self.seconds.append(time.perf_counter() - t)

        self.thread = threading.Thread(target=run, name="bench-delete")
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def report_save(what: str, s: Any) -> None:
    print(
        f"  {what} {s.step}: {s.bytes / 1e9:.2f} GB ({s.reused_bytes / 1e9:.2f} GB in place), write "
        f"{s.write_s:.2f} s ({s.gbps:.2f} GB/s; of it copy {s.copy_s:.2f}, disk wait {s.write_wait_s:.2f}, "
        f"crc32 wait {s.crc_wait_s:.2f}, update wait {s.ready_wait_s:.2f}, commit {s.commit_s:.2f}, "
        f"prune {s.prune_s:.2f}; ring made in {s.ring_s:.2f} s, not counted), call "
        f"{s.call_s:.3f} s (waiting for the one before {s.waited_s:.3f} s), host records captured after "
        f"{s.capture_s:.2f} s, hold {s.hold_s:.3f} s, "
        f"device copy {s.device_copy}",
        flush=True,
    )


def stat_dict(s: Any) -> dict[str, Any]:
    return {
        "step": s.step,
        "bytes": s.bytes,
        "reused_bytes": s.reused_bytes,
        "way": "overwrite" if s.reused_bytes > s.bytes / 2 else "fresh",
        "write_s": s.write_s,
        "GBps": s.gbps,
        "call_s": s.call_s,
        "waited_s": s.waited_s,
        "hold_s": s.hold_s,
        "stall_s": s.stall_s,
        "prune_s": s.prune_s,
        "commit_s": s.commit_s,
        "ring_s": s.ring_s,
        "capture_s": s.capture_s,
        "copy_s": s.copy_s,
        "write_wait_s": s.write_wait_s,
        "crc_wait_s": s.crc_wait_s,
        "ready_wait_s": s.ready_wait_s,
        "device_copy": s.device_copy,
    }


def run_dcp(a: argparse.Namespace, model: Any, step: Callable[[], float]) -> dict[str, Any]:
    """torch.distributed.checkpoint.async_save of the same tensors, steps running meanwhile."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    sd = dcp_state(model)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    if not dist.is_initialized():  # one process: DCP's plan exchange runs on gloo (CPU objects)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    path = a.dir / "dcp"
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_S)  # our checkpoints' deletion settles first: DCP writes fresh files
    t0 = time.perf_counter()
    fut = dcp.async_save(sd, checkpoint_id=str(path))
    call_s = time.perf_counter() - t0
    times = []
    while not fut.done() and len(times) < a.steps:
        times.append(step())
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


def disk_probe(d: Path, nbytes: int, repeat: int = 2) -> dict[str, Any]:
    """The disk written as the saves write it (see the module docstring): GB/s fresh, overwrite."""
    import numpy as np

    import offload.io as oio
    from offload.memory import PinnedPool

    path = d / f".disk-probe-{os.getpid()}.bin"
    ring = 4
    out: dict[str, list[float]] = {"fresh": [], "overwrite": []}
    with (
        PinnedPool(ring * PROBE_CHUNK, arena_bytes=PROBE_CHUNK, pin=False, name="disk-probe") as pool,
        oio.Engine() as engine,
    ):
        leases = [pool.lease(PROBE_CHUNK, purpose="probe") for _ in range(ring)]
        rng = np.random.default_rng(0)
        for lease in leases:
            lease.tensor.numpy()[:] = np.frombuffer(rng.bytes(PROBE_CHUNK), dtype=np.uint8)
        for _ in range(repeat):
            path.unlink(missing_ok=True)
            os.sync()
            time.sleep(SETTLE_S)
            out["fresh"].append(probe_write(oio, engine, path, "x", leases, nbytes))
            out["overwrite"].append(probe_write(oio, engine, path, "r+", leases, nbytes))
        for lease in leases:
            lease.release()
    path.unlink(missing_ok=True)
    return {
        "how": f"offload.io O_DIRECT, {PROBE_CHUNK >> 20} MiB chunks, {ring} in flight, fsync included, "
        f"{nbytes / 2**30:.2f} GiB; fresh: a new fallocated file after sync + {SETTLE_S:.0f} s; "
        "overwrite: the same file written again; median of "
        f"{repeat}",
        "fresh_GBps": statistics.median(out["fresh"]),
        "overwrite_GBps": statistics.median(out["overwrite"]),
        "runs": out,
    }


def probe_write(oio: Any, engine: Any, path: Path, mode: str, leases: list[Any], nbytes: int) -> float:
    t = time.perf_counter()
    with oio.open(path, mode, engine=engine) as f:
        f.allocate(nbytes)
        pending: list[Any] = []
        for i, at in enumerate(range(0, nbytes, PROBE_CHUNK)):
            if len(pending) == len(leases):
                pending.pop(0).wait()
            pending.append(f.write_from(leases[i % len(leases)], at, min(PROBE_CHUNK, nbytes - at)))
        for p in pending:
            p.wait()
        f.sync()
    return nbytes / (time.perf_counter() - t) / 1e9


def cpu_probe(nbytes: int = 1 << 30) -> dict[str, float]:
    """GB/s of what the writer does to each byte on the CPU: zlib.crc32 and the native crc32
    (device bytes), the plain copy, and the summing copy into staging (host bytes), on one thread
    and on the threads the writer uses (staging.CRC_THREADS, COPY_THREADS)."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from offload import _C
    from offload.checkpoint.staging import COPY_THREADS, CRC_THREADS

    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)

    def rate(fn: Callable[[np.ndarray, np.ndarray], Any], threads: int) -> float:
        part = -(-nbytes // threads)
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(lambda i: fn(dst[i : i + part], src[i : i + part]), range(0, nbytes, part)))
            return nbytes / (time.perf_counter() - t) / 1e9

    copy, crc = np.copyto, lambda d, s: zlib.crc32(s.data)

    def native(d: np.ndarray, s: np.ndarray) -> int:
        return _C.crc32(s.ctypes.data, s.size)

    def summed(d: np.ndarray, s: np.ndarray) -> int:
        return _C.copy_crc32(d.ctypes.data, s.ctypes.data, s.size)

    rate(copy, 1)  # touches dst once
    return {
        "crc32_GBps_1": rate(crc, 1),
        f"crc32_GBps_{CRC_THREADS}": rate(crc, CRC_THREADS),
        "crc32_native_GBps_1": rate(native, 1),
        "copy_GBps_1": rate(copy, 1),
        f"copy_GBps_{COPY_THREADS}": rate(copy, COPY_THREADS),
        "copy_crc32_GBps_1": rate(summed, 1),
        f"copy_crc32_GBps_{COPY_THREADS}": rate(summed, COPY_THREADS),
    }


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
    staging: int | None,
    disk: dict[str, Any],
    plain: list[float],
    ours: dict[str, Any],
    dcp: dict[str, Any] | None,
) -> dict[str, Any]:
    import torch

    base = statistics.mean(plain)
    for s in ours["idle"] + ours["stats"]:
        s["over_disk"] = s["GBps"] / disk[f"{s['way']}_GBps"]
        s["stall_pct"] = 100 * s["stall_s"] / base
    # A step is *writing* when a save made at the end of the step before it is being written
    # during it; the others (the plain steps and those after no save) are *quiet*. Writing steps
    # against quiet ones, both taken in the same stretch of the run, is the save's cost.
    after_save = [False, *ours["saved"][:-1]]
    steps = [
        {"step": i + 1, "s": t, "save": saved, "writing": w, "over_plain_pct": 100 * (t - base) / base}
        for i, (t, saved, w) in enumerate(zip(ours["step_s"], ours["saved"], after_save))
    ]
    quiet = plain + [t["s"] for t in steps if not t["writing"]]
    writing = [t["s"] for t in steps if t["writing"]]
    timed = steps[a.save_every - 1 :]  # from the first save on
    stats = ours["stats"]
    gbps = statistics.median(s["GBps"] for s in stats)
    way = stats[0]["way"]
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "host": platform.node(),
        "size": a.size,
        "save_every": a.save_every,
        "accumulate": a.accumulate,
        "gradients": a.gradients,
        "prune": a.prune,
        "params_B": nparams / 1e9,
        "batch": batch,
        "seq": seq,
        "staging_GB": staging / 1e9 if staging else None,
        "checkpoint_GB": stats[0]["bytes"] / 1e9,
        "state_GB": state_bytes / 1e9,
        "disk": disk,
        "disk_write_GBps": disk[f"{way}_GBps"],
        "disk_way": way,
        "step_s": base,
        "step_s_with_save": statistics.mean(t["s"] for t in timed),
        "stall_pct": 100 * (statistics.mean(t["s"] for t in timed) - base) / base,
        "step_s_quiet": quiet,
        "step_s_writing": writing,
        "stall_pct_writing": 100
        * (statistics.mean(writing) - statistics.mean(quiet))
        / statistics.mean(quiet),
        "stall_pct_writing_median": 100
        * (statistics.median(writing) - statistics.median(quiet))
        / statistics.median(quiet),
        "stall_s_per_step": sum(s["stall_s"] for s in stats) / len(timed),
        "stall_pct_stats": 100 * sum(s["stall_s"] for s in stats) / len(timed) / base,
        "flush_GBps": gbps,
        "flush_over_disk": gbps / disk[f"{way}_GBps"],
        "writer_alone": ours["idle"],
        "plain_steps": plain,
        "steps": steps,
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
    d = r["disk"]
    lines = [
        f"\n{r['size']} ({r['params_B']:.2f}B params, checkpoint {r['checkpoint_GB']:.1f} GB) on {r['device']}, "
        f"batch {r['batch']} x {r['seq']} x {r['accumulate']} micro-batches; prune {r['prune']}",
        f"disk ({d['how']}): fresh {d['fresh_GBps']:.2f} GB/s, overwrite {d['overwrite_GBps']:.2f} GB/s",
    ]
    for s in r["writer_alone"]:
        lines.append(
            f"writer alone, save {s['step']} ({s['way']}): {s['GBps']:.2f} GB/s, {s['over_disk']:.2f} x the disk {s['way']}"
        )
    lines += [
        f"{'':<22} {'step s':>8} {'stall s':>8} {'stall %':>8} {'GB/s':>7} {'/disk':>6}",
        f"{'no checkpoint':<22} {r['step_s']:>8.3f}",
        f"{'offload.save every ' + str(r['save_every']):<22} {r['step_s_with_save']:>8.3f} {r['stall_s_per_step']:>8.3f} "
        f"{r['stall_pct']:>8.1f} {r['flush_GBps']:>7.2f} {r['flush_over_disk']:>6.2f}  ({r['disk_way']})",
        f"{'  steps writing':<22} {statistics.mean(r['step_s_writing']):>8.3f} {'':>8} {r['stall_pct_writing']:>8.1f}"
        f"  against {len(r['step_s_quiet'])} quiet steps, {statistics.mean(r['step_s_quiet']):.3f} s "
        f"(medians: {r['stall_pct_writing_median']:+.1f}%)",
    ]
    dc = r.get("dcp")
    if dc:
        step = statistics.mean(dc["step_s"]) if dc["step_s"] else float("nan")
        lines.append(
            f"{'dcp.async_save once':<22} {step:>8.3f} {dc['call_s']:>8.3f} {dc['stall_pct']:>8.1f} "
            f"{dc['GBps']:>7.2f} {dc['GBps'] / d['fresh_GBps']:>6.2f}  (fresh)"
        )
    lines.append(f"saved after step {'GB/s':>6} {'/disk':>6} {'call s':>7} {'hold s':>7} {'prune s':>8} way")
    for s in r["offload"]["stats"]:
        lines.append(
            f"{s['after_step']:>16} {s['GBps']:>6.2f} {s['over_disk']:>6.2f} {s['call_s']:>7.3f} {s['hold_s']:>7.3f} "
            f"{s['prune_s']:>8.2f} {s['way']}"
        )
    lines.append(
        "step s: mean from the first save on. stall %: its excess over the steps without saves (steps "
        "writing: the steps a save is written during, against the quiet ones: plain, or after no save); stall s: "
        "offload = save() calls + optimizer held by the capture fence, summed over the saves / steps (the "
        "JSON has per-step excess and stall_pct_stats); dcp = the async_save call. GB/s: bytes / writer "
        "time (offload, median per save), bytes / time to the future's result (dcp); /disk: against the "
        "probe written the same way."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
