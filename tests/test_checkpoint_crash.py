"""Crash safety of the checkpoint commit: a trainer saving every step is killed with SIGKILL at
random moments; what it leaves must always be loadable and resume exactly. Trials alternate
between synchronous saves (``save(...).wait()`` after each step) and asynchronous ones (the save
writes in the background while the next steps train; each save() waits for the one before). A
few more trials save with ``keep_last=1, prune="before"`` (each save writes over the files of the
step before it): there a kill inside a save may leave no checkpoint at all (by design), but never
a listed one that fails to verify or resume, and never a ``latest`` naming a step that is gone;
and one more such save afterwards takes back every directory the killed trainer left behind.

A supervisor subprocess imports torch and offload once and forks one trainer per trial (a fresh
interpreter per trial would cost seconds of imports each); the trainer is a real process that
wraps the tiny model on the CPU in float32 and saves after every step until the supervisor kills
it (seeded random delays, counted from the moment the trainer says on a pipe that its model
is wrapped, so a slow machine's wrap does not leave trials that never saved; some kills land
inside a save). After each kill: every listed
checkpoint verifies, ``latest`` (if there) names a committed step, no ``.tmp-`` directory is
listed (checked here), and loading the root (its ``latest``) into a fresh wrap and training two
more steps gives bitwise the losses of a straight run at those step numbers. The supervisor runs
those losses after all kills, in its own clean process like the trainers': the pytest process
may carry global state from earlier tests (after the export test, which loads a model with
transformers, its float32 losses differed), which would break bitwise equality for reasons that
have nothing to do with checkpoints.

Run as a script, this file is the supervisor: ``test_checkpoint_crash.py BASE TRIALS SEED``.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import offload
from offload.checkpoint import list_checkpoints, load, save, verify
from offload.checkpoint.format import is_committed, latest_marker, read_manifest, resolve
from tests.models import batches, tiny

TRIALS = 10 if os.environ.get("CI") else 20  # CI machines are slower; 10 kills still cover it
RECYCLE_TRIALS = 4 if os.environ.get("CI") else 6  # after those: keep_last=1, prune="before"
RECLAIM_STEP = 10_000  # the supervisor's save into a prune="before" trial's root, after the kill
MAX_STEPS = 200  # far more than a trainer reaches (about 50 steps a second) before the kill
OPT = {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5}
DELAY_S = (0.0, 0.7)  # after the trainer has wrapped its model (it says so on a pipe)
READY_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[1]


def make() -> tuple[Any, Any]:
    return offload.wrap(tiny("llama"), device="cpu", dtype="float32", optimizer=OPT)


def step(model: Any, opt: Any, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.item())


def trainer(root: Path, asynchronous: bool, recycle: bool, ready: int) -> None:
    """Trains and saves after every step (step_N: N steps done) until killed; writes a byte to
    the file descriptor ready once its model is wrapped (the kill's delay counts from there, so
    a slow machine's wrap does not eat into it)."""
    data = batches(MAX_STEPS + 2)
    model, opt = make()
    os.write(ready, b"1")
    prune = {"keep_last": 1, "prune": "before"} if recycle else {}
    for i in range(MAX_STEPS):
        step(model, opt, data[i])
        handle = save(model, opt, root, step=i + 1, **prune)
        if not asynchronous:
            handle.wait()


def supervise(base: Path, trials: int, seed: int) -> None:
    """Forks one trainer per trial and kills it with SIGKILL after a seeded random delay; then, in
    this clean process, resumes each trial's newest step for 2 steps and runs the straight
    reference. Prints one JSON line per trial and one with the straight losses."""
    torch.set_num_threads(1)  # no intra-op thread pool exists in this process before fork
    rng = random.Random(seed)
    outcomes = []
    for t in range(trials + RECYCLE_TRIALS):
        root = base / f"trial_{t:02d}"
        delay = rng.uniform(*DELAY_S)
        asynchronous = t % 2 == 1
        recycle = t >= trials
        wait_fd, ready_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(wait_fd)
                trainer(root, asynchronous, recycle, ready_fd)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(ready_fd)
        select.select([wait_fd], [], [], READY_TIMEOUT_S)  # the trainer wrapped its model (or died)
        os.close(wait_fd)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        outcomes.append(
            {
                "root": str(root),
                "delay": delay,
                "async": asynchronous,
                "recycle": recycle,
                "killed": killed,
                "status": status,
            }
        )
    data = batches(MAX_STEPS + 2)
    for out in outcomes:
        if list_checkpoints(out["root"]):
            model, opt = make()
            load(model, opt, out["root"])  # the step latest names (or the newest committed one)
            out["last"] = read_manifest(resolve(out["root"]))["step"]
            out["resumed"] = [step(model, opt, data[out["last"] + i]) for i in range(2)]
            model.runtime.close()
        if out["recycle"]:  # the killed trainer's leftovers are reclaimed by the next such save
            model, opt = make()
            save(model, opt, out["root"], step=RECLAIM_STEP, keep_last=1, prune="before").wait()
            model.runtime.close()
            out["left"] = [
                p.name
                for p in Path(out["root"]).iterdir()
                if p.name.startswith("step_") and ".tmp-" in p.name
            ]
            out["reclaimed"] = not out["left"]
        print(json.dumps(out), flush=True)
    model, opt = make()
    reach = max((out.get("last", 0) for out in outcomes), default=0) + 2
    print(json.dumps({"straight": [step(model, opt, ids) for ids in data[:reach]]}), flush=True)
    model.runtime.close()


def check_leftovers(root: Path) -> int | None:
    """The invariants a kill must not break; returns the step to resume from (None: no save)."""
    found = list_checkpoints(root)
    for _, path in found:
        assert ".tmp-" not in path.name
        assert verify(path) == [], path
    name = latest_marker(root) if root.exists() else None
    if name is not None:
        assert is_committed(root / name), f"latest names {name}, not a committed step"
        assert name in {p.name for _, p in found}
    return int(read_manifest(resolve(root))["step"]) if found else None


def test_sigkill_during_saves_leaves_loadable_checkpoints(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(TRIALS), "1234"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *trials, reference = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(trials) == TRIALS + RECYCLE_TRIALS
    straight = reference["straight"]
    resumed_from: dict[str, list[int]] = {"sync": [], "async": [], "recycle": []}
    for out in trials:
        root = Path(out["root"])
        assert out["killed"], f"trainer of {root} ended before the kill: {out}"
        last = check_leftovers(root)
        if out["recycle"]:
            assert out["reclaimed"] and last == RECLAIM_STEP, f"{root}: leftovers not reclaimed: {out}"
            last = out.get("last")
        assert last == out.get("last"), f"{root}: the supervisor resumed from {out.get('last')}"
        if last is not None:
            resumed_from["recycle" if out["recycle"] else "async" if out["async"] else "sync"].append(last)
            assert out["resumed"] == straight[last : last + 2], f"{root}: resumed from step {last}"
    for mode in ("sync", "async"):  # with prune="before" a kill mid-save leaves none: no minimum
        steps = resumed_from[mode]
        assert len(steps) >= TRIALS // 4, f"too few trials saved anything ({mode}): {steps}"
    leftovers = [p for out in trials for p in Path(out["root"]).glob("*.tmp-*")]
    print(
        f"resumed from steps {resumed_from['sync']} (sync), {resumed_from['async']} (async), "
        f"{resumed_from['recycle']} (prune before); {len(leftovers)} interrupted saves left behind"
    )


if __name__ == "__main__":
    supervise(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
