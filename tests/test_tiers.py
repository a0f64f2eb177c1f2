"""The optimizer-state tiers (offload/store/tiers): NvmeTier on its own, and training with Adam's
m and v on NVMe against the same training with them in host memory. The match must be bitwise:
the same kernels run on the same numbers, only where m and v wait between steps changes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import offload
import offload.io as oio
from offload.config import ConfigError
from offload.store.tiers import NvmeTier
from offload.store.tiers.nvme import _half_bytes
from tests.models import batches, tiny

STEPS = 6
REPO = Path(__file__).resolve().parent.parent


def train(
    dtype: str, accum: int = 1, layers: int = 4, **overrides: Any
) -> tuple[Any, list[float], dict[str, torch.Tensor]]:
    """STEPS optimizer steps of a tiny Llama of layers blocks, each over accum micro-batches (the
    loss divided by accum, as a training loop does); returns the wrapped model, every
    micro-batch's loss and the final weights."""
    model = tiny("llama", layers=layers)
    overrides.setdefault("optimizer", {"lr": 3e-3})
    wrapped, opt = offload.wrap(model, device="cpu", dtype=dtype, **overrides)
    losses = []
    data = batches(STEPS * accum)
    for step in range(STEPS):
        for ids in data[step * accum : (step + 1) * accum]:
            loss = wrapped(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return wrapped, losses, offload.state_dict(wrapped)


CASES = {
    "fp32": ("float32", {}, {}),
    "bf16-one-pass": ("bfloat16", {}, {}),
    "clipped": ("float32", {"optimizer": {"lr": 3e-3, "max_grad_norm": 0.5}}, {}),
    "overlap": ("bfloat16", {"optimizer": {"lr": 3e-3, "overlap_backward": True}}, {}),
    "device-block": ("float32", {}, {"device_blocks": 1}),
}


@pytest.mark.parametrize(
    ("case", "drives"), [(case, 1) for case in CASES] + [("fp32", 2), ("bf16-one-pass", 2)]
)
def test_nvme_state_trains_bitwise_like_host(disk_dir: Path, case: str, drives: int) -> None:
    dtype, extra, placement = CASES[case]
    dirs = [str(disk_dir / f"drive{k}") for k in range(drives)]
    for d in dirs:
        os.mkdir(d)
    host, host_losses, host_state = train(dtype, placement=placement, **extra)
    nvme, losses, state = train(
        dtype, placement={**placement, "optimizer_state": "nvme"}, nvme_dirs=dirs, **extra
    )
    assert losses == host_losses  # bitwise
    for key, value in host_state.items():
        assert torch.equal(state[key], value), key

    tier = nvme.runtime.state_tier
    assert isinstance(tier, NvmeTier)
    streamed = [r for r in nvme.runtime.blocks if not r.on_device]
    for k, (rec, ref) in enumerate(zip(streamed, [r for r in host.runtime.blocks if not r.on_device])):
        path = Path(tier.path(rec))
        assert path.parent.parent == Path(dirs[k % drives])  # round-robin over the drives
        half = _half_bytes(rec.numel)
        assert path.stat().st_size == 2 * half
        words = np.fromfile(path, dtype=np.float32)
        assert rec.exp_avg is None and rec.exp_avg_sq is None
        assert torch.equal(torch.from_numpy(words[: rec.numel].copy()), ref.exp_avg)
        assert torch.equal(torch.from_numpy(words[half // 4 : half // 4 + rec.numel].copy()), ref.exp_avg_sq)
        assert rec.state_bytes() == ref.state_bytes() - 8 * rec.numel
    assert tier.stored_bytes() == sum(2 * _half_bytes(r.numel) for r in streamed)
    nvme.runtime.close()
    assert not any(any(Path(d).iterdir()) for d in dirs)  # the run's files are gone
    host.runtime.close()


NUMA = Path("/sys/devices/system/node/node0").is_dir()
PLACEMENTS: dict[str, dict[str, Any]] = {
    "optimizer-nvme": {"placement": {"optimizer_state": "nvme"}},
    "master-and-optimizer-nvme": {"placement": {"optimizer_state": "nvme", "master": "nvme"}},
    "partial-spill": {"placement": {"optimizer_state": "nvme", "spill_blocks": 2}},
    "partial-spill-with-masters": {
        "placement": {"optimizer_state": "nvme", "master": "nvme", "spill_blocks": 1}
    },
    "optimizer-cxl-node-0": {"placement": {"optimizer_state": "cxl"}, "cxl_nodes": [0]},
    "master-cxl-node-0": {"placement": {"master": "cxl"}, "cxl_nodes": [0]},
    "master-cxl-optimizer-nvme": {
        "placement": {"optimizer_state": "nvme", "master": "cxl"},
        "cxl_nodes": [0],
    },
    "partial-spill-master-and-optimizer-cxl": {
        "placement": {"optimizer_state": "cxl", "master": "cxl", "spill_blocks": 3},
        "cxl_nodes": [0, 0],
    },
}


@pytest.mark.parametrize(("dtype", "overlap"), [("bfloat16", True), ("float32", False)])
def test_every_placement_trains_bitwise_alike(disk_dir: Path, dtype: str, overlap: bool) -> None:
    """Issue 4's exactness: one tiny run, the same losses and weights bit for bit whichever tier
    holds m, v and the masters (masters leave host RAM only in bfloat16: in float32 the master
    is the pinned copy the device reads). Gradient sums on CXL: tests/test_tiers_cxl.py."""
    opt = {"lr": 3e-3, "overlap_backward": overlap}
    _, ref_losses, ref_state = train(dtype, optimizer=opt)
    for name, extra in PLACEMENTS.items():
        if ("master" in name and dtype == "float32") or ("cxl" in name and not NUMA):
            continue
        wrapped, losses, state = train(dtype, optimizer=opt, nvme_dirs=[str(disk_dir)], **extra)
        assert losses == ref_losses, name  # bitwise
        for key, value in ref_state.items():
            assert torch.equal(state[key], value), (name, key)
        rt = wrapped.runtime
        k = extra["placement"].get("spill_blocks", len(rt.blocks))
        assert list(rt.spilled) == list(range(len(rt.blocks) - k, len(rt.blocks))), name  # the last k
        masters_out = extra["placement"].get("master") in ("nvme", "cxl")
        assert [r.master_on_tier for r in rt.blocks] == [masters_out and i in rt.spilled for i in range(4)]
        rt.close()


def test_masters_on_nvme_live_in_the_files(disk_dir: Path) -> None:
    """The file of a spilled block holds master, m and v (each 4096-aligned), equal to what the
    host placement keeps in its records; host RAM keeps the wire copy and the gradient."""
    host, _, _ = train("bfloat16")
    nvme, _, _ = train(
        "bfloat16", placement={"optimizer_state": "nvme", "master": "nvme"}, nvme_dirs=[str(disk_dir)]
    )
    tier = nvme.runtime.state_tier
    assert isinstance(tier, NvmeTier) and tier.master
    nvme.runtime.wait_updates()
    for rec, ref in zip(nvme.runtime.blocks, host.runtime.blocks):
        half = _half_bytes(rec.numel) // 4
        words = torch.from_numpy(np.fromfile(tier.path(rec), dtype=np.float32))
        assert words.numel() == 3 * half
        for k, t in enumerate((ref.master, ref.exp_avg, ref.exp_avg_sq)):
            assert torch.equal(words[k * half : k * half + rec.numel], t)
        assert rec.master.is_meta and rec.state_bytes() == 2 * 2 * rec.numel  # bf16 wire and gradient
    assert tier.stored_bytes() == sum(3 * _half_bytes(r.numel) for r in nvme.runtime.blocks)
    nvme.runtime.close()
    host.runtime.close()


@dataclass
class FakeRecord:
    index: int
    numel: int
    master: torch.Tensor

    @property
    def name(self) -> str:
        return f"block.{self.index}"


@pytest.mark.parametrize("master", [False, True])
def test_tier_stages_three_blocks_and_round_trips(disk_dir: Path, master: bool) -> None:
    tier = NvmeTier([str(disk_dir)], 3000, master=master)
    recs = [FakeRecord(i, 3000 - i, torch.full((3000 - i,), 0.5)) for i in range(5)]
    for rec in recs:
        tier.place(rec)  # type: ignore[arg-type]
        assert rec.master.is_meta == master  # the file holds it now
    halves = 3 if master else 2
    for step in range(1, 4):
        for k, rec in enumerate(recs):
            if k + 1 < len(recs):
                tier.prefetch(recs[k + 1])  # type: ignore[arg-type]
            w, m, v = tier.acquire(rec)  # type: ignore[arg-type]
            assert torch.equal(m, torch.full_like(m, step - 1.0)) and torch.equal(v, -m)
            assert torch.equal(w, torch.full_like(w, 0.5 + step - 1)) if master else w is rec.master
            m.fill_(step)
            v.fill_(-step)
            w.add_(1 if master else 0)
            tier.release(rec)  # type: ignore[arg-type]
            assert tier._pool.stats().in_use <= 3 * halves * _half_bytes(3000)
    tier.flush()
    half = _half_bytes(3000) // 4
    words = np.fromfile(tier.path(recs[4]), dtype=np.float32)  # type: ignore[arg-type]
    assert words.size == halves * half
    m_at = half if master else 0
    assert (words[m_at : m_at + recs[4].numel] == 3).all() and (
        words[m_at + recs[4].numel : m_at + half] == 0
    ).all()
    if master:
        assert (words[: recs[4].numel] == 3.5).all()
    tier.close()
    with pytest.raises(RuntimeError, match="closed"):
        tier.acquire(recs[0])  # type: ignore[arg-type]


def test_tier_reads_the_next_rounds_first_block_ahead_and_survives_a_changed_order(disk_dir: Path) -> None:
    """Releasing a round's last block starts reading the block the round began with (the next
    step's first update), so the disk works through forward and backward; when the order changes,
    the guess is only a wasted read: every acquire still sees the state last released."""
    tier = NvmeTier([str(disk_dir)], 2000)
    recs = [FakeRecord(i, 2000, torch.zeros(2000)) for i in range(4)]
    for rec in recs:
        tier.place(rec)  # type: ignore[arg-type]
    orders = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [1, 3, 0, 2]]
    value = dict.fromkeys(range(4), 0.0)
    for r, order in enumerate(orders):
        for k, i in enumerate(order):
            if k == 0 and r in (2, 3):  # the order repeated: the last release read 0 ahead
                assert 0 in tier._staged and tier._staged[0].name == "block.0"
            _, m, v = tier.acquire(recs[i])  # type: ignore[arg-type]
            assert torch.equal(m, torch.full_like(m, value[i])) and torch.equal(v, -m)
            value[i] += 1
            m.fill_(value[i])
            v.fill_(-value[i])
            tier.release(recs[i])  # type: ignore[arg-type]
    tier.flush()
    for i in range(4):
        words = np.fromfile(tier.path(recs[i]), dtype=np.float32)  # type: ignore[arg-type]
        assert (words[:2000] == value[i]).all()
    tier.close()


def test_missing_dir_names_it(disk_dir: Path) -> None:
    missing = disk_dir / "no" / "such"
    with pytest.raises(ConfigError, match=r"nvme_dirs\[0\].*does not exist and cannot be created") as e:
        offload.wrap(
            tiny("llama"), device="cpu", placement={"optimizer_state": "nvme"}, nvme_dirs=[str(missing)]
        )
    assert str(missing) in str(e.value)


def test_missing_dir_with_a_parent_is_created(disk_dir: Path) -> None:
    tier = NvmeTier([str(disk_dir / "fresh")], 100)
    assert (disk_dir / "fresh").is_dir()
    tier.close()


def test_config_without_nvme_dirs() -> None:
    with pytest.raises(ConfigError, match=r"nvme_dirs.*placement uses the nvme tier"):
        offload.wrap(tiny("llama"), device="cpu", placement={"optimizer_state": "nvme"})


def test_dir_refusing_o_direct() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or oio.check_direct(shm).ok or not os.access(shm, os.W_OK):
        pytest.skip("no tmpfs that refuses O_DIRECT here")
    with pytest.raises(ConfigError, match="refuses O_DIRECT") as e:
        NvmeTier([str(shm)], 100)
    assert "/dev/shm" in str(e.value)


def test_filesystem_without_o_direct_is_refused(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs before Linux 6.6 (and some FUSE filesystems) refuse O_DIRECT with EINVAL at open.
    This machine's tmpfs allows it, so the probe's open is made to refuse as theirs do: a clear
    error naming the directory, no silent fallback to the page cache."""
    real = os.open

    def refuse_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    with pytest.raises(ConfigError) as e:
        offload.wrap(
            tiny("llama"), device="cpu", placement={"optimizer_state": "nvme"}, nvme_dirs=[str(disk_dir)]
        )
    assert str(e.value) == (
        f"nvme_dirs[0] = {str(disk_dir)!r}: the filesystem of {disk_dir} refuses O_DIRECT (tmpfs or similar): "
        "Invalid argument"
    )


def test_disk_full_mid_run_names_the_tier_and_bytes_and_the_checkpoint_survives(
    disk_dir: Path, tmp_path: Path
) -> None:
    """The drive fills after step 2: every write of block 2's state fails with ENOSPC, raised by
    the io engine (the block's file is swapped for /dev/full). The error names the tier, the
    block and the bytes; the last checkpoint, taken before, is intact and resumes."""
    cfg: dict[str, Any] = {
        "device": "cpu",
        "dtype": "float32",
        "optimizer": {"lr": 3e-3},
        "placement": {"optimizer_state": "nvme"},
        "nvme_dirs": [str(disk_dir)],
    }
    wrapped, opt = offload.wrap(tiny("llama", layers=4), **cfg)
    data = batches(4)

    def step(ids: torch.Tensor) -> None:
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    step(data[0])
    step(data[1])
    offload.save(wrapped, opt, tmp_path / "ckpt", step=2).wait()
    good = offload.state_dict(wrapped)
    rt = wrapped.runtime
    tier = rt.state_tier
    assert isinstance(tier, NvmeTier)
    victim = rt.blocks[2]
    nbytes = 2 * _half_bytes(victim.numel)
    real = tier._files[victim.index]
    tier._files[victim.index] = oio.open("/dev/full", "r+", direct=False, engine=tier._engine)
    try:
        with pytest.raises((RuntimeError, OSError)) as e:
            for ids in data[2:]:
                step(ids)
            rt.wait_updates()
        assert (
            f"nvme tier: moving block.2's m and v ({nbytes} bytes) failed: No space left on device "
            f"(the disk is full) during write of {nbytes} bytes at offset 0"
        ) in str(e.value)
    finally:
        real.close()
        rt.close()
    fresh, fresh_opt = offload.wrap(tiny("llama", layers=4), **cfg)
    offload.load(fresh, fresh_opt, tmp_path / "ckpt")
    for key, value in offload.state_dict(fresh).items():
        assert torch.equal(value, good[key]), key
    fresh.runtime.close()


UNWRITABLE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from offload.store.tiers import NvmeTier   # imported first: nobody cannot read root's Python
    if os.geteuid() == 0:
        os.setgid(65534); os.setuid(65534)   # root ignores permissions: become nobody
    try:
        NvmeTier([sys.argv[1]], 1024)
    except ValueError as err:
        print("ERROR", err)
        sys.exit(0)
    print("NO ERROR")
    """
)


def test_unwritable_dir_names_it() -> None:
    # /tmp, not tmp_path: pytest's own directories are closed to the user nobody. The check fails
    # on the permission before O_DIRECT matters, so any filesystem does.
    top = Path(tempfile.mkdtemp(prefix="offload-tiers-"))
    top.chmod(0o755)
    d = top / "locked"
    d.mkdir()
    d.chmod(0o555)
    try:
        out = subprocess.run(
            [sys.executable, "-c", UNWRITABLE_SCRIPT, str(d)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    finally:
        d.chmod(0o755)
        shutil.rmtree(top)
    assert out.returncode == 0, out.stderr
    assert "ERROR nvme_dirs[0]" in out.stdout and str(d) in out.stdout, out.stdout
    assert "is not writable: Permission denied" in out.stdout, out.stdout


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    import offload

    class Block(torch.nn.Module):  # plain torch: the subprocess need not import transformers
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, x):
            return x + torch.tanh(self.lin(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(3))
            self.head = torch.nn.Linear(64, 1)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x).square().mean()

    wrapped, opt = offload.wrap(
        Net(), device="cpu", dtype="float32",
        placement={"optimizer_state": "nvme"}, nvme_dirs=[sys.argv[1]],
    )
    # The files were filled at wrap; from now on no write may reach past the first 4 KiB (Python
    # ignores SIGXFSZ, so the write fails with EFBIG), as when a drive fills mid-run.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        for _ in range(4):
            wrapped(torch.randn(8, 64)).backward()
            opt.step()
            opt.zero_grad()
        offload.state_dict(wrapped)
    except (RuntimeError, OSError) as err:
        print("ERROR", err)
        sys.exit(0)
    print("NO ERROR")
    """
)


def test_disk_full_during_training_names_the_file(disk_dir: Path) -> None:
    env = {**os.environ, "OFFLOAD_IO_BACKEND": "threads"}
    out = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(disk_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "file size limit" in out.stdout, out.stdout
    assert str(disk_dir) in out.stdout and ".adam" in out.stdout, out.stdout


def test_host_placement_keeps_state_in_records() -> None:
    wrapped, _, _ = train("float32")
    assert all(r.exp_avg is not None for r in wrapped.runtime.records())
    assert wrapped.runtime.state_tier.stored_bytes() == 0
    wrapped.runtime.close()
