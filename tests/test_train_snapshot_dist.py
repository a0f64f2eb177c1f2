"""``offload train --nproc 3`` with train.snapshot, each rank its own node with its own keeper (parity
m = 1, k = 2), killed with SIGKILL in the middle of the run and started again (issue 8 through the
trainer; tests/test_snapshot_dist.py does the same with a hand-written loop):

- a trainer crashes: the restart restores every rank from its keeper;
- a node is lost (its trainer and its keeper): the restart rebuilds that rank from parity;
- more nodes are lost than parity covers: the restart falls back to the run's newest checkpoint
  (written by rank 0 for all, loaded by every rank) and says so.

Each time the continued losses and the final weights equal a straight run's bitwise (float32 on the
CPU, one thread per rank). The killed runs are long (train.steps = LONG with a constant learning
rate, so that train.steps changes no update); the test kills once the keepers (or the checkpoint
directory) hold what it needs, never after a delay, and the restart runs to REF steps, or further
when the killed run got that far. Every job's processes are killed after the test (``jobs``), every
keeper too (``keepers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import torch
from safetensors.torch import load_file

from offload.checkpoint import list_checkpoints
from offload.cli.main import main as cli
from offload.snapshot import segment
from offload.snapshot.client import KeeperClient
from offload.snapshot.keeper import KeeperError
from offload.train.ranks import torchrun
from tests.keepers import kill_keeper

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
WORLD = 3
LONG = 100_000
REF = 10
"""The steps of the shared straight run; a restart goes on to REF steps."""
GUARD_S = 300.0
"""A wait that takes longer fails the test, with the job's output (it never decides an outcome)."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
T = TypeVar("T")


def recipe(run: Path, steps: int, *more: str) -> list[str]:
    """The tiny recipe shrunk (a 2-layer model, one row of 32 tokens per rank), a constant rate;
    writing to run/out, checkpoints to ckpt beside run (shared by the runs of one test)."""
    sets = {
        "train.steps": steps,
        "train.batch_size": 1,
        "train.seq_len": 32,
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.intermediate_size": 128,
        "train.schedule.name": "constant",
        "train.schedule.warmup_steps": 0,
        "train.log_every": 1,
        "train.save_every": "null",
        "train.output_dir": run / "out",
        "train.checkpoint_dir": run.parent / "ckpt",
    }
    return [TINY, *(x for k, v in sets.items() for x in ("--set", f"{k}={v}")), *more]


def snapshots(keepers: Path) -> list[str]:
    where = str(keepers / "node{rank}")
    return ["--set", f"train.snapshot={{every: 1, dir: '{where}', idle_timeout_s: 120}}"]


class Job:
    """``offload train`` on 3 ranks (the command ``offload train --nproc 3`` runs) in the
    background, every rank's output in a file."""

    def __init__(self, argv: list[str], cwd: Path, name: str) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.name, self.log = name, cwd / f"{name}.log"
        cmd = [*torchrun(WORLD), "-m", "offload.cli.main", "train", *argv]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        self.trainers: dict[int, psutil.Process] = {}

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: Callable[[], T | None], until: str) -> T:
        """what()'s first true value, checked while the job runs; fails if the job ends first."""
        deadline = time.monotonic() + GUARD_S
        while not (got := what()):
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} ended (exit {self.proc.returncode}) before {until}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {until} after {GUARD_S:.0f} s:\n{self.tail()}")
            time.sleep(0.02)
        return got

    def kill(self, *ranks: int) -> None:
        """SIGKILLs the trainers of ranks (torchrun then ends the others with SIGTERM)."""
        found = self.wait_for(lambda: self._trainers(), "every rank's trainer started")
        for rank in ranks:
            found[rank].send_signal(signal.SIGKILL)

    def end(self) -> int:
        try:
            return self.proc.wait(timeout=GUARD_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not end:\n{self.tail()}")

    def close(self) -> None:
        """Kills what is left of the job: torchrun and the trainers (in sessions of their own)."""
        self._trainers()
        left = [*self.trainers.values(), *self._children()]
        self.proc.kill()
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not all(_gone(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.proc.wait()

    def tail(self) -> str:
        return self.output()[-6000:]

    def _children(self) -> list[psutil.Process]:
        try:
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def _trainers(self) -> dict[int, psutil.Process] | None:
        """rank -> its trainer process, once all are there (remembered for close())."""
        for p in self._children():
            try:
                if "offload.cli.main" in p.cmdline() and "RANK" in (env := p.environ()):
                    self.trainers[int(env["RANK"])] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return self.trainers if len(self.trainers) == WORLD else None


def _gone(p: psutil.Process) -> bool:
    """Exited: no such process, or a zombie (a trainer whose torchrun was killed before it)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """start(name, steps, *more) -> the shrunk recipe running in tmp_path/name (recipe()); every
    job is killed after the test."""
    started: list[Job] = []

    def start(name: str, steps: int, *more: str) -> Job:
        started.append(Job(recipe(tmp_path / name, steps, *more), tmp_path / name, name))
        return started[-1]

    try:
        yield start
    finally:
        for job in started:
            job.close()


def run(where: Path, steps: int, *more: str) -> str:
    """Runs the shrunk recipe in where (recipe()) to its end; its output."""
    job = Job(recipe(where, steps, *more), where, where.name)
    try:
        code = job.end()
    finally:
        job.close()
    assert code == 0, job.tail()
    return job.output()


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """steps -> the output directory of a straight run of that many steps (no snapshots), made
    once per length."""
    base = tmp_path_factory.mktemp("straight")
    done: dict[int, Path] = {}

    def get(steps: int) -> Path:
        if steps not in done:
            run(base / f"run{steps}", steps)
            done[steps] = base / f"run{steps}" / "out"
        return done[steps]

    return get


def held(node: Path) -> list[dict[str, Any]]:
    """The committed headers of the job's segments in the keeper of node ([] when none runs)."""
    try:
        client = KeeperClient.connect(node, start=False)
    except KeeperError:
        return []
    try:
        segments = client.list()
    finally:
        client.close()
    return [s["header"] for s in segments if s["job"] == "tiny" and s["header"] and s["header"]["step"] >= 0]


def with_parity(nodes: list[Path]) -> int:
    """The newest step whose data and parity every node's keeper holds (-1: none)."""
    return min(max((h["step"] for h in held(n) if h["parity_step"] == h["step"]), default=-1) for n in nodes)


def newest(nodes: list[Path]) -> int:
    """The newest step any of the nodes' keepers holds data of (-1: none)."""
    return max((h["step"] for n in nodes for h in held(n)), default=-1)


def continues_exactly(out: Path, ref: Path, start: int) -> dict[str, Any]:
    """The run in out went on from step start as the straight run in ref did, bit for bit."""
    summary, expect = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert summary["start_step"] == start
    assert summary["losses"] == expect["losses"][start:]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return dict(summary)


def plans_what_the_keepers_hold(
    nodes: list[Path], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """offload plan --snapshot-nodes 3 counts (k + m) / k = 1.5 times each rank's master, m and v,
    twice (two buffers): what each keeper holds, but for what the plan leaves out per buffer (the
    header, the index, about 20 KiB: the RNG states, times 1.5, and the rounding of the chunks)."""
    capsys.readouterr()
    assert cli(["plan", *argv, "--no-detect", "--world-size", "3", "--snapshot-nodes", "3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    planned = plan["bytes"]["snapshot"]["host"]
    assert "(k + m) / k = 1.50 x its master, m and v" in plan["notes"][-1]
    for node in nodes:
        client = KeeperClient.connect(node, start=False)
        try:
            held = sum(s["nbytes"] for s in client.list() if s["job"] == "tiny")
        finally:
            client.close()
        slack = 2 * (segment.HEADER_BYTES + 3 * (16 << 10) + 3 * 4096)
        assert 0 <= held - planned <= slack, (node, held, planned)


def test_a_crashed_trainer_restores_from_the_keepers_and_a_lost_node_from_parity(
    keepers: Path,
    tmp_path: Path,
    jobs: Callable[..., Job],
    straight: Callable[[int], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    nodes = [keepers / f"node{r}" for r in range(WORLD)]
    snap = snapshots(keepers)

    # Rank 2's trainer crashes once every keeper holds step 2 with its parity.
    first = jobs("first", LONG, *snap)
    first.wait_for(lambda: with_parity(nodes) >= 2, "snapshot of step 2 with parity in every keeper")
    first.kill(2)
    assert first.end() != 0
    plans_what_the_keepers_hold(nodes, recipe(tmp_path / "first", LONG), capsys)

    # Started again, every rank restores from its own keeper. Once the keepers hold two more
    # steps, rank 1's node is lost: its trainer and its keeper.
    second = jobs("second", LONG, *snap)
    resumed = r"resuming from the snapshot of job 'tiny', from the keepers \(step (\d+)\)"
    at = int(second.wait_for(lambda: re.search(resumed, second.output()), "resuming line").group(1))
    assert at >= 2
    assert f"restored step {at} of job 'tiny': ranks [0, 1, 2] from their keepers" in second.output()
    second.wait_for(lambda: with_parity(nodes) >= at + 2, f"snapshot of step {at + 2} in every keeper")
    second.kill(1)
    kill_keeper(nodes[1])
    assert second.end() != 0

    # Started again: ranks 0 and 2 from their keepers, rank 1 rebuilt from parity.
    steps = max(REF, newest(nodes) + 2)
    output = run(tmp_path / "third", steps, *snap)
    summary = json.loads((tmp_path / "third" / "out" / "summary.json").read_text())
    rebuilt = summary["start_step"]
    assert summary["resumed_from"] == "parity" and rebuilt >= at + 2
    assert (
        f"restored step {rebuilt} of job 'tiny': ranks [0, 2] from their keepers, ranks [1] rebuilt from parity"
        in output
    )
    assert (
        f"resuming from the snapshot of job 'tiny', ranks [1] rebuilt from parity (step {rebuilt})" in output
    )
    continues_exactly(tmp_path / "third" / "out", straight(steps), rebuilt)
    assert [held(n) for n in nodes] == [[], [], []]  # the finished run dropped its snapshots


def test_more_lost_nodes_than_parity_fall_back_to_the_runs_checkpoint(
    keepers: Path, tmp_path: Path, jobs: Callable[..., Job], straight: Callable[[int], Path]
) -> None:
    nodes = [keepers / f"node{r}" for r in range(WORLD)]
    snap = [*snapshots(keepers), "--set", "train.save_every=2"]
    ckpt = tmp_path / "ckpt"

    def saved() -> int:
        found = list_checkpoints(ckpt)
        return found[-1][0] if found else -1

    # Once a checkpoint is committed and every keeper holds a newer snapshot with its parity, the
    # nodes of ranks 0 and 1 are lost (m + 1 = 2): their trainers and keepers.
    first = jobs("first", LONG, *snap)
    first.wait_for(lambda: 2 <= saved() < with_parity(nodes), "a checkpoint and a newer snapshot")
    first.kill(0, 1)
    kill_keeper(nodes[0])
    kill_keeper(nodes[1])
    assert first.end() != 0
    # The job is gone: nothing changes any more. Rank 2's keeper still holds a step (so the
    # checkpoint directory counts: a crash), usually newer than the checkpoint, which a save that
    # committed just before the kill may have overtaken.
    step, lost = saved(), newest(nodes)
    assert step >= 2 and lost >= 3

    steps = max(REF, lost + 2, step + 2)
    output = run(tmp_path / "second", steps, *snap)
    path = ckpt / f"step_{step:06d}"
    assert (
        f"offload snapshot: the in-memory snapshot of job 'tiny' is lost: step {lost} is gone from ranks "
        "[0, 1] (their node or keeper lost, or the snapshot incomplete), more than the 1 lost node(s) per "
        f"coding group parity can rebuild; falling back to the disk checkpoint {path} (step {step})"
    ) in output
    assert (
        f"resuming from {path} (step {step}): the keepers cannot restore the snapshot of job 'tiny'" in output
    )
    summary = continues_exactly(tmp_path / "second" / "out", straight(steps), step)
    assert summary["resumed_from"] == "disk"
