"""The optimizer-state tiers (offload/store/tiers): NvmeTier on its own, and training with Adam's
m and v on NVMe against the same training with them in host memory. The match must be bitwise:
the same kernels run on the same numbers, only where m and v wait between steps changes."""

from __future__ import annotations

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


def train(dtype: str, **overrides: Any) -> tuple[Any, list[float], dict[str, torch.Tensor]]:
    model = tiny("llama", layers=4)
    overrides.setdefault("optimizer", {"lr": 3e-3})
    wrapped, opt = offload.wrap(model, device="cpu", dtype=dtype, **overrides)
    losses = []
    for ids in batches(STEPS):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
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


@dataclass
class FakeRecord:
    index: int
    numel: int

    @property
    def name(self) -> str:
        return f"block.{self.index}"


def test_tier_stages_three_blocks_and_round_trips(disk_dir: Path) -> None:
    tier = NvmeTier([str(disk_dir)], 3000)
    recs = [FakeRecord(i, 3000 - i) for i in range(5)]
    for rec in recs:
        tier.place(rec)  # type: ignore[arg-type]
    for step in range(1, 4):
        for k, rec in enumerate(recs):
            if k + 1 < len(recs):
                tier.prefetch(recs[k + 1])  # type: ignore[arg-type]
            m, v = tier.acquire(rec)  # type: ignore[arg-type]
            assert torch.equal(m, torch.full_like(m, step - 1.0)) and torch.equal(v, -m)
            m.fill_(step)
            v.fill_(-step)
            tier.release(rec)  # type: ignore[arg-type]
            assert tier._pool.stats().in_use <= 3 * 2 * _half_bytes(3000)
    tier.flush()
    words = np.fromfile(tier.path(recs[4]), dtype=np.float32)  # type: ignore[arg-type]
    assert (words[: recs[4].numel] == 3).all() and (words[recs[4].numel : _half_bytes(3000) // 4] == 0).all()
    tier.close()
    with pytest.raises(RuntimeError, match="closed"):
        tier.acquire(recs[0])  # type: ignore[arg-type]


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
