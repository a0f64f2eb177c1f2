"""offload.plan.account: a tiny CPU run's measured figures against its plan. The pinned pool and
the store are counted by the same rules as the plan, so they match exactly; the peak RSS is
reported (its ratio depends on the test process, which holds much besides this run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import offload
from offload.config import Tier, load_config
from offload.plan import account, make_plan
from tests.models import batches, tiny


def test_tiny_run_accounts_exactly_for_pinned_store_and_nvme(disk_dir: Path) -> None:
    model = tiny("llama", layers=4)
    cfg = load_config(
        None,
        device="cpu",
        dtype="bfloat16",
        placement={"optimizer_state": "nvme", "spill_blocks": 2},
        nvme_dirs=[str(disk_dir)],
    )
    plan = make_plan(model, cfg, batch_size=2, seq_len=16)
    wrapped, opt = offload.wrap(model, cfg, plan=plan)
    try:
        for ids in batches(2):
            wrapped(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        wrapped.runtime.wait_updates()
        acc = account(plan, wrapped.runtime)
        for name in ("pinned", "host store", "nvme state"):
            f = acc.get(name)
            assert f.measured == f.predicted > 0 and f.ratio == 1.0, f
        rss = acc.get("host peak RSS")
        assert rss.measured > 0 and rss.predicted == plan.needed[offload.config.Tier.HOST]
        assert not math.isnan(rss.ratio)
        line = acc.line()
        assert line.startswith("plan vs measured (measured/predicted): pinned ") and "host peak RSS" in line
        assert "(1.000)" in line and "gpu" not in line  # no device figure on the CPU
        assert json.loads(json.dumps(acc.to_json()))["pinned"]["ratio"] == 1.0
    finally:
        wrapped.runtime.close()


@pytest.mark.skipif(not Path("/sys/devices/system/node/node0").is_dir(), reason="no NUMA nodes")
@pytest.mark.parametrize(
    "placement",
    [
        {"master": "cxl", "gradients": "cxl"},
        {"optimizer_state": "nvme", "master": "cxl", "gradients": "cxl", "spill_blocks": 2},
        {"optimizer_state": "cxl", "master": "cxl", "gradients": "cxl", "spill_blocks": 3},
    ],
)
def test_masters_and_gradient_sums_on_cxl_account_exactly(disk_dir: Path, placement: dict) -> None:
    """Two micro-batches a step: the gradient sums exist once the run has accumulated, and the
    plan made with grad_accum 2 counts them where they are (host for the blocks not spilled, cxl
    for the spilled ones), as it counts the masters on cxl."""
    model = tiny("llama", layers=4)
    cfg = load_config(
        None,
        device="cpu",
        dtype="bfloat16",
        placement=placement,
        nvme_dirs=[str(disk_dir)],
        cxl_nodes=[0],
    )
    plan = make_plan(model, cfg, batch_size=2, seq_len=16, grad_accum=2)
    assert plan.get("master", Tier.CXL) > 0 and plan.get("grad_accum", Tier.CXL) > 0
    wrapped, opt = offload.wrap(model, cfg, plan=plan)
    try:
        data = batches(4)
        for step in range(2):
            for ids in data[2 * step : 2 * step + 2]:
                (wrapped(input_ids=ids, labels=ids).loss / 2).backward()
            opt.step()
            opt.zero_grad()
        wrapped.runtime.wait_updates()
        acc = account(plan, wrapped.runtime)
        nvme = placement.get("optimizer_state") == "nvme"
        names = ["pinned", "host store", "cxl state"] + (["nvme state"] if nvme else [])
        for name in names:
            f = acc.get(name)
            assert f.measured == f.predicted > 0 and f.ratio == 1.0, f
    finally:
        wrapped.runtime.close()


def test_unknown_figure_names_the_ones_there_are() -> None:
    wrapped, _ = offload.wrap(tiny("llama"), device="cpu", dtype="float32")
    acc = account(wrapped.runtime.plan, wrapped.runtime)
    with pytest.raises(
        KeyError, match=r"no figure 'cxl state'; there are \['pinned', 'host store', 'host peak RSS'\]"
    ):
        acc.get("cxl state")
    wrapped.runtime.close()
