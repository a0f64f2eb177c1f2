"""The placement planner (offload/plan) and ``offload plan``: bytes equal what offload.wrap
allocates on tiny models, the shipped recipes' plans, refusal with numbers and a fix, JSON, errors.
Every model here is tiny or on the meta device; budgets are always explicit."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

import offload
from offload.cli import CliError
from offload.cli import plan as plan_cli
from offload.config import Config, ConfigError, Tier, load_config
from offload.model.hf import build_on_meta
from offload.plan import Plan, make_plan
from offload.store.tiers import CxlMasterTier
from offload.train import load_recipe
from offload.train.recipe import build_hf_config
from offload.utils.sizes import format_bytes
from tests.models import tiny

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30


def plan_and_wrap(**overrides: object) -> tuple[Plan, offload.OffloadedModel]:
    model = tiny("llama", layers=4)
    cfg = load_config(None, device="cpu", **overrides)
    plan = make_plan(model, cfg, batch_size=2, seq_len=16)
    wrapped, _ = offload.wrap(model, cfg)
    return plan, wrapped


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("device_blocks", "device_residents"), [(0, None), (2, None), (2, False), (0, True)])
def test_bytes_equal_what_wrap_allocates(
    dtype: str, device_blocks: int, device_residents: bool | None
) -> None:
    plan, wrapped = plan_and_wrap(
        dtype=dtype, placement={"device_blocks": device_blocks, "device_residents": device_residents}
    )
    rt = wrapped.runtime
    assert rt.resident is not None
    assert rt.resident.on_device == (device_blocks > 0 if device_residents is None else device_residents)
    host = sum(r.state_bytes() for r in rt.records() if not r.on_device)
    device = sum(r.state_bytes() for r in rt.records() if r.on_device)
    assert plan.store_bytes(Tier.HOST) == host
    assert plan.store_bytes(Tier.GPU) == device
    assert (device > 0) == (device_blocks > 0 or rt.resident.on_device)
    assert plan.pinned_bytes == rt.pool.config.capacity
    item = torch.finfo(rt.dtype).bits // 8
    assert rt.resident_flat is not None
    # A device resident record's wire copy is the parameters' buffer: counted as store state.
    copy = 0 if rt.resident.on_device else rt.resident_flat.numel() * item
    allocated = (
        rt.executor.slots.nbytes() + sum(s.numel() * s.element_size() for s in rt.executor.staging) + copy
    )
    # The rest of device_buffers (the residents' .grad and their gather buffer) exists only in backward.
    transient = (copy // item + plan.shape.resident_trainable) * item
    assert plan.get("device_buffers", Tier.GPU) == allocated + transient


def test_optimizer_on_nvme_equals_the_files_and_staging(disk_dir: Path) -> None:
    plan, wrapped = plan_and_wrap(
        dtype="bfloat16", placement={"optimizer_state": "nvme"}, nvme_dirs=[str(disk_dir)]
    )
    rt = wrapped.runtime
    try:
        assert plan.placement["optimizer_state"] is Tier.NVME
        assert plan.get("optimizer", Tier.NVME) == rt.state_tier.stored_bytes()
        assert plan.store_bytes(Tier.HOST) == sum(r.state_bytes() for r in rt.records())
        assert plan.get("optimizer", Tier.HOST) == 8 * plan.shape.resident_numel  # residents stay in RAM
        assert plan.get("nvme_staging", Tier.HOST) == rt.state_tier._pool.config.capacity
        assert plan.pinned_bytes == rt.pool.config.capacity
    finally:
        rt.close()


def test_meta_model_plans_like_the_real_one() -> None:
    model = tiny("qwen2", layers=3)  # tied embeddings: counted once
    cfg = Config(device="cpu")
    meta = build_on_meta(model.config)
    assert make_plan(meta, cfg, batch_size=2, seq_len=8) == make_plan(model, cfg, batch_size=2, seq_len=8)
    assert make_plan(meta, cfg, batch_size=2, seq_len=8).shape.params == sum(
        p.numel() for p in model.parameters()
    )


def recipe_plan(name: str, *overrides: str, **kwargs: object) -> Plan:
    recipe = load_recipe(REPO / "recipes" / name, overrides)
    model = build_on_meta(build_hf_config(recipe.model, 259))
    t = recipe.train
    return make_plan(model, recipe.offload, batch_size=t.batch_size, seq_len=t.seq_len, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "params", "device_blocks"), [("llama-3b.yaml", 3.43e9, 12), ("llama-7b.yaml", 6.74e9, 10)]
)
def test_recipe_state_is_16_bytes_per_param_split_gpu_host(
    name: str, params: float, device_blocks: int
) -> None:
    plan = recipe_plan(name)
    assert plan.shape.params == pytest.approx(params, rel=2e-3)
    state = plan.store_bytes(Tier.GPU) + plan.store_bytes(Tier.HOST)
    # 4 (fp32 master) + 8 (Adam m, v) + 2 (bf16 wire) + 2 (bf16 gradient); padding is < 0.01 %.
    assert state == pytest.approx(16 * plan.shape.params, rel=1e-4)
    assert plan.device_blocks == device_blocks
    # The residents (embeddings, norm, head) join the device blocks on the device by default.
    on_device = device_blocks * plan.shape.block_numel + plan.shape.resident_numel
    assert plan.store_bytes(Tier.GPU) == 16 * on_device
    assert plan.store_bytes(Tier.NVME) == 0
    hidden = plan.shape.hidden_size
    assert plan.get("activations", Tier.GPU) == plan.shape.blocks * 4 * 2048 * hidden * 2  # type: ignore[operator]
    assert plan.fits  # no budgets given: unbounded


def test_recipe_with_optimizer_on_nvme_moves_m_and_v() -> None:
    host = recipe_plan("llama-7b.yaml")
    nvme = recipe_plan("llama-7b.yaml", "offload.placement.optimizer_state=nvme", "offload.nvme_dirs=[/x]")
    streamed = host.shape.blocks - host.device_blocks
    assert nvme.get("optimizer", Tier.NVME) == streamed * 8 * host.shape.block_numel  # already 4096-aligned
    assert (
        host.get("optimizer", Tier.HOST) - nvme.get("optimizer", Tier.HOST)
        == streamed * 8 * host.shape.block_numel
    )
    assert nvme.get("nvme_staging", Tier.HOST) == 3 * 8 * host.shape.block_numel


def test_auto_optimizer_state_takes_host_when_it_fits_else_nvme() -> None:
    roomy = recipe_plan(
        "llama-7b.yaml", "offload.placement.optimizer_state=auto", "offload.budgets.host_bytes=512GiB"
    )
    assert roomy.placement["optimizer_state"] is Tier.HOST and roomy.fits
    tight = recipe_plan(
        "llama-7b.yaml",
        "offload.placement.optimizer_state=auto",
        "offload.budgets.host_bytes=48GiB",
        "offload.nvme_dirs=[/x]",
    )
    assert tight.placement["optimizer_state"] is Tier.NVME and tight.fits
    assert tight.needed[Tier.HOST] <= 48 * GiB


def test_world_size_shards_the_streamed_blocks() -> None:
    """Each rank holds 1/W of every streamed block's store state; residents and device blocks
    are replicated; the host's need adds up the ranks on it."""
    one = recipe_plan("llama-3b.yaml", "offload.placement.device_residents=false")
    two = recipe_plan("llama-3b.yaml", "offload.placement.device_residents=false", world_size=2)
    streamed = one.shape.blocks - one.device_blocks
    resident = 16 * one.shape.resident_numel  # whole on every rank
    assert two.store_bytes(Tier.HOST) - resident == (one.store_bytes(Tier.HOST) - resident) // 2
    assert one.store_bytes(Tier.HOST) - resident == 16 * streamed * one.shape.block_numel
    assert two.store_bytes(Tier.GPU) == one.store_bytes(Tier.GPU)
    per_rank = two.needed[Tier.HOST] // 2
    assert two.needed[Tier.HOST] == 2 * per_rank and per_rank < one.needed[Tier.HOST]
    alone = recipe_plan(
        "llama-3b.yaml", "offload.placement.device_residents=false", world_size=2, local_ranks=1
    )
    assert alone.needed[Tier.HOST] == per_rank  # one rank per host: this host holds its share


def test_world_size_errors() -> None:
    with pytest.raises(ValueError, match="local_ranks = 3: more than world_size = 2"):
        recipe_plan("llama-3b.yaml", world_size=2, local_ranks=3)
    with pytest.raises(ValueError, match="world_size = 0: must be >= 1"):
        recipe_plan("llama-3b.yaml", world_size=0)


def test_gpu_over_budget_suggests_fewer_device_blocks() -> None:
    plan = recipe_plan("llama-3b.yaml", "offload.budgets.gpu_bytes=16GiB")
    assert not plan.fits
    (problem,) = plan.problems
    assert problem.startswith(
        "gpu: needs 30.8 GiB, budget 16 GiB (over by 14.8 GiB): raise budgets.gpu_bytes"
    )
    k = int(problem.split("lower placement.device_blocks to ")[1].split(",")[0])
    assert recipe_plan(
        "llama-3b.yaml", "offload.budgets.gpu_bytes=16GiB", f"offload.placement.device_blocks={k}"
    ).fits
    assert not recipe_plan(
        "llama-3b.yaml", "offload.budgets.gpu_bytes=16GiB", f"offload.placement.device_blocks={k + 1}"
    ).fits


# ---- offload plan ---------------------------------------------------------------------------------


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    plan_cli.add_parser(parser.add_subparsers())
    return plan_cli.run(parser.parse_args(["plan", *argv]))


def test_cli_refuses_a_plan_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(
        str(REPO / "recipes" / "llama-7b.yaml"),
        "--no-detect",
        "--set",
        "offload.budgets.host_bytes=64GiB",
        "--set",
        "offload.budgets.gpu_bytes=80GiB",
    )
    assert code == 1
    out = capsys.readouterr()
    assert re.search(r"host +68\.35 +64\.00 +NO", out.out)
    assert (
        "does not fit: host: needs 68.3 GiB, budget 64 GiB (over by 4.3 GiB): raise budgets.host_bytes by "
        "4.3 GiB, or put the last 6 blocks' optimizer_state on nvme (optimizer_state auto, or nvme with "
        "spill_blocks 6: needs 9.0 GiB of nvme and name nvme_dirs), or raise placement.device_blocks to 12"
    ) in out.err


def test_cli_prints_a_table_and_succeeds_when_it_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(
            str(REPO / "recipes" / "llama-3b.yaml"),
            "--no-detect",
            "--set",
            "offload.budgets.host_bytes=64GiB",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "26 blocks (12 on the device)" in out and "total per rank" in out and "pinned:" in out


def test_cli_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(str(REPO / "recipes" / "tiny.yaml"), "--no-detect", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["placement"]["optimizer_state"] == "nvme"
    assert data["bytes"]["optimizer"]["nvme"] > 0 and data["budgets"]["host"] is None
    assert sum(data["bytes"][k]["host"] for k in data["bytes"]) == data["total_per_rank"]["host"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("offload.placement.device_blocks=-1", "offload.placement.device_blocks = -1: must be >= 0"),
        ("offload.budgets.host_bytes=lots", "offload.budgets.host_bytes = 'lots': invalid size"),
        (
            "offload.placement.optimizer_state=tape",
            "offload.placement.optimizer_state = 'tape': expected one of",
        ),
    ],
)
def test_cli_bad_recipe_field_names_it(override: str, message: str) -> None:
    with pytest.raises(CliError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cli(str(REPO / "recipes" / "llama-3b.yaml"), "--no-detect", "--set", override)


def test_cli_missing_recipe() -> None:
    with pytest.raises(CliError, match="does not exist"):
        cli("no-such-recipe.yaml")


def test_optimizer_on_cxl_equals_the_bound_leases() -> None:
    plan, wrapped = plan_and_wrap(dtype="bfloat16", placement={"optimizer_state": "cxl"}, cxl_nodes=[0])
    rt = wrapped.runtime
    try:
        assert plan.placement["optimizer_state"] is Tier.CXL
        assert plan.get("optimizer", Tier.CXL) == rt.state_tier.stored_bytes()
        assert plan.store_bytes(Tier.HOST) == sum(r.state_bytes() for r in rt.records())
        assert not any("cxl" in note and "not built" in note for note in plan.notes)
    finally:
        rt.close()


# ---- partial placement, automatic choices, and the runtime following the plan ----------------------


NUMA = Path("/sys/devices/system/node/node0").is_dir()


@pytest.mark.parametrize(
    ("dtype", "placement", "extra"),
    [
        ("bfloat16", {"optimizer_state": "nvme", "spill_blocks": 2}, {}),
        ("float32", {"optimizer_state": "nvme", "spill_blocks": 2, "device_blocks": 1}, {}),
        ("bfloat16", {"optimizer_state": "nvme", "master": "nvme", "spill_blocks": 3}, {}),
        ("bfloat16", {"optimizer_state": "nvme", "master": "nvme"}, {}),
        pytest.param(
            "bfloat16",
            {"optimizer_state": "cxl", "spill_blocks": 1},
            {"cxl_nodes": [0]},
            marks=pytest.mark.skipif(not NUMA, reason="kernel exposes no NUMA nodes"),
        ),
        pytest.param(
            "bfloat16",
            {"master": "cxl"},
            {"cxl_nodes": [0]},
            marks=pytest.mark.skipif(not NUMA, reason="kernel exposes no NUMA nodes"),
        ),
        pytest.param(
            "bfloat16",
            {"optimizer_state": "nvme", "master": "cxl", "gradients": "cxl", "spill_blocks": 2},
            {"cxl_nodes": [0, 0]},
            marks=pytest.mark.skipif(not NUMA, reason="kernel exposes no NUMA nodes"),
        ),
        pytest.param(
            "float32",
            {"gradients": "cxl", "spill_blocks": 3, "device_blocks": 1},
            {"cxl_nodes": [0]},
            marks=pytest.mark.skipif(not NUMA, reason="kernel exposes no NUMA nodes"),
        ),
    ],
)
def test_partial_placement_bytes_equal_what_wrap_allocates(
    disk_dir: Path, dtype: str, placement: dict, extra: dict
) -> None:
    plan, wrapped = plan_and_wrap(dtype=dtype, placement=placement, nvme_dirs=[str(disk_dir)], **extra)
    rt = wrapped.runtime
    try:
        streamed = 4 - placement.get("device_blocks", 0)
        k = placement.get("spill_blocks", streamed)
        assert rt.spilled == plan.spilled == range(4 - k, 4)  # the last k blocks
        tier = plan.placement["optimizer_state"]
        assert tier is Tier(placement.get("optimizer_state", "host"))
        assert plan.placement["master"] is Tier(placement.get("master", "host"))
        assert plan.placement["gradients"] is Tier(placement.get("gradients", "host"))
        suffix = " (master, m and v)" if placement.get("master") == "nvme" else ""
        kinds = (("master", "master"), ("gradient sums", "gradients"))
        moved = [f"{kind} cxl" for kind, field in kinds if placement.get(field) == "cxl"]
        suffix += f" ({', '.join(moved)})" if moved else ""
        assert plan.split().endswith(f"{k} blocks {tier}{suffix}"), plan.split()
        assert plan.store_bytes(Tier.HOST) == sum(r.state_bytes() for r in rt.records() if not r.on_device)
        assert plan.store_bytes(Tier.GPU) == sum(r.state_bytes() for r in rt.records() if r.on_device)
        for t in (Tier.NVME, Tier.CXL):  # gradient sums come with the first accumulation: none yet
            assert plan.store_bytes(t) == rt.stored_bytes(t), t
        if tier is Tier.NVME:
            files = rt.state_tier.state if isinstance(rt.state_tier, CxlMasterTier) else rt.state_tier
            assert plan.get("nvme_staging", Tier.HOST) == files._pool.config.capacity  # type: ignore[attr-defined]
        assert plan.pinned_bytes == rt.pool.config.capacity
        for rec in rt.blocks:
            spilled = rec.index in plan.spilled
            assert (rt.tier_of(rec) is rt.state_tier) == spilled
            assert rec.master_on_tier == (spilled and placement.get("master") in ("nvme", "cxl"))
            assert (rec.exp_avg is None) == (spilled and tier is not Tier.HOST)
            assert (rec.grad_acc_tier is not None) == (spilled and placement.get("gradients") == "cxl")
    finally:
        rt.close()


def test_cxl_placements_count_in_the_cxl_column() -> None:
    """Masters and gradient sums on cxl move 4 bytes a parameter each from the host column to the
    cxl column (the sums only when accumulating), page-rounded per block as the leases are."""
    host = recipe_plan("llama-7b.yaml", "offload.cxl_nodes=[0]", grad_accum=2)
    cxl = recipe_plan(
        "llama-7b.yaml",
        "offload.cxl_nodes=[0]",
        "offload.placement.master=cxl",
        "offload.placement.gradients=cxl",
        grad_accum=2,
    )
    streamed = host.shape.blocks - host.device_blocks
    n = host.shape.block_numel
    page = -(-4 * n // 4096) * 4096
    assert cxl.spilled == range(host.device_blocks, host.shape.blocks) and cxl.spill_blocks == streamed
    assert cxl.get("master", Tier.CXL) == cxl.get("grad_accum", Tier.CXL) == streamed * page
    assert host.get("master", Tier.HOST) - cxl.get("master", Tier.HOST) == streamed * 4 * n
    assert host.get("grad_accum", Tier.HOST) == streamed * 4 * n and cxl.get("grad_accum", Tier.HOST) == 0
    assert cxl.needed[Tier.CXL] == 2 * streamed * page
    assert cxl.needed[Tier.HOST] == host.needed[Tier.HOST] - 2 * streamed * 4 * n
    assert cxl.placement["master"] is cxl.placement["gradients"] is Tier.CXL
    assert cxl.split().endswith(f"{streamed} blocks host (master cxl, gradient sums cxl)")
    table = cxl.table()
    assert re.search(r"grad_accum +\S+ +0\.00 +\d+\.\d\d +0\.00", table), table
    data = cxl.to_json()
    assert data["placement"]["master"] == "cxl" and data["bytes"]["master"]["cxl"] == streamed * page


def test_cxl_over_its_budget_names_the_tier_and_the_fixes() -> None:
    one = recipe_plan("llama-7b.yaml", "offload.cxl_nodes=[0]").shape.block_numel * 4
    page = -(-one // 4096) * 4096
    plan = recipe_plan(
        "llama-7b.yaml",
        "offload.cxl_nodes=[0]",
        "offload.placement.master=cxl",
        f"offload.budgets.cxl_bytes={10 * page}",
    )
    assert not plan.fits
    (problem,) = plan.problems
    streamed = plan.shape.blocks - plan.device_blocks
    over = (streamed - 10) * page
    assert problem.startswith(
        f"cxl: needs {format_bytes(streamed * page)}, budget {format_bytes(10 * page)} "
        f"(over by {format_bytes(over)}): raise budgets.cxl_bytes by {format_bytes(over)}"
    )
    assert problem.endswith("or lower placement.spill_blocks to 10, or put master on host"), problem
    assert recipe_plan(
        "llama-7b.yaml",
        "offload.cxl_nodes=[0]",
        "offload.placement.master=cxl",
        "offload.placement.spill_blocks=10",
        f"offload.budgets.cxl_bytes={10 * page}",
    ).fits


def test_host_over_budget_suggests_masters_and_gradient_sums_on_cxl_where_there_is_cxl() -> None:
    sets = ("offload.budgets.host_bytes=70GiB", "offload.budgets.gpu_bytes=80GiB")
    without = recipe_plan("llama-7b.yaml", *sets, grad_accum=2)
    assert not without.fits
    assert not any("cxl" in p for p in without.problems)  # no cxl_nodes: no CXL to suggest
    plan = recipe_plan("llama-7b.yaml", *sets, "offload.cxl_nodes=[0]", grad_accum=2)
    (problem,) = plan.problems
    assert "or put the last 22 blocks' masters on cxl (master cxl: needs 16.6 GiB of cxl)" in problem
    assert "or put the last 22 blocks' gradient sums on cxl (gradients cxl: needs 16.6 GiB of cxl)" in problem
    for field in ("master", "gradients"):
        assert recipe_plan(
            "llama-7b.yaml", *sets, "offload.cxl_nodes=[0]", f"offload.placement.{field}=cxl", grad_accum=2
        ).fits


def spill_need(name: str, k: int, *overrides: str) -> int:
    """The host need of recipe name with its last k streamed blocks' m and v on nvme."""
    sets = (
        "offload.placement.optimizer_state=nvme",
        f"offload.placement.spill_blocks={k}",
        "offload.nvme_dirs=[/x]",
    )
    return recipe_plan(name, *sets, *overrides).needed[Tier.HOST]


def test_auto_spills_the_fewest_last_blocks_that_fit_the_host_budget() -> None:
    budget = 60 * GiB
    plan = recipe_plan(
        "llama-7b.yaml",
        "offload.placement.optimizer_state=auto",
        f"offload.budgets.host_bytes={budget}",
        "offload.nvme_dirs=[/x]",
    )
    k = plan.spill_blocks
    assert plan.fits and 0 < k < plan.shape.blocks - plan.device_blocks
    assert plan.placement["optimizer_state"] is Tier.NVME and plan.placement["master"] is Tier.HOST
    assert (
        spill_need("llama-7b.yaml", k)
        == plan.needed[Tier.HOST]
        <= budget
        < spill_need("llama-7b.yaml", k - 1)
    )
    assert plan.spilled == range(plan.shape.blocks - k, plan.shape.blocks)
    assert f"{plan.shape.blocks - plan.device_blocks - k} blocks host, {k} blocks nvme" in plan.table()
    assert plan.to_json()["spill_blocks"] == k


def test_auto_spills_masters_when_m_and_v_are_not_enough() -> None:
    every = spill_need("llama-7b.yaml", 22)  # 32 blocks, 10 on the device: every streamed block's m and v
    sets = (
        "offload.placement.optimizer_state=auto",
        f"offload.budgets.host_bytes={every - 1}",
        "offload.nvme_dirs=[/x]",
    )
    kept = recipe_plan("llama-7b.yaml", *sets)  # master host (the recipe's): m and v only, over budget
    assert not kept.fits and kept.spill_blocks == 22 and kept.placement["master"] is Tier.HOST
    plan = recipe_plan("llama-7b.yaml", *sets, "offload.placement.master=auto")
    assert plan.fits and plan.placement["master"] is Tier.NVME and plan.spill_blocks < 22
    assert plan.get("master", Tier.NVME) == plan.spill_blocks * 4 * plan.shape.block_numel
    assert "(master, m and v)" in plan.split()


def test_auto_spills_m_and_v_to_cxl_before_nvme() -> None:
    """With cxl_nodes named, auto moves the fewest last blocks' m and v to cxl memory (no disk
    floor on the step), as long as the cxl budget holds them; else to nvme as without cxl."""
    budget = 60 * GiB
    sets = (
        "offload.placement.optimizer_state=auto",
        f"offload.budgets.host_bytes={budget}",
        "offload.nvme_dirs=[/x]",
        "offload.cxl_nodes=[0]",
    )
    plan = recipe_plan("llama-7b.yaml", *sets, "offload.budgets.cxl_bytes=64GiB")
    on_nvme = recipe_plan("llama-7b.yaml", *sets[:3])
    k = plan.spill_blocks
    # nvme also takes host memory for its staging buffers: cxl spills fewer blocks
    assert plan.fits and plan.placement["optimizer_state"] is Tier.CXL and 0 < k <= on_nvme.spill_blocks
    assert plan.get("optimizer", Tier.CXL) > 0 and plan.get("optimizer", Tier.NVME) == 0
    assert any(f"the last {k} of" in n and "m and v on cxl" in n and "before a disk" in n for n in plan.notes)
    small = recipe_plan("llama-7b.yaml", *sets, f"offload.budgets.cxl_bytes={plan.needed[Tier.CXL] - 1}")
    assert small.placement["optimizer_state"] is Tier.NVME and small.fits
    assert small.spill_blocks == on_nvme.spill_blocks


def test_auto_spills_masters_to_cxl_when_m_and_v_are_not_enough() -> None:
    every = recipe_plan(  # every streamed block's m and v on cxl
        "llama-7b.yaml",
        "offload.placement.optimizer_state=cxl",
        "offload.placement.spill_blocks=22",
        "offload.cxl_nodes=[0]",
    ).needed[Tier.HOST]
    sets = (
        "offload.placement.optimizer_state=auto",
        f"offload.budgets.host_bytes={every - 1}",
        "offload.cxl_nodes=[0]",
        "offload.budgets.cxl_bytes=512GiB",
    )
    kept = recipe_plan("llama-7b.yaml", *sets)  # master host (the recipe's): m and v only, over budget
    assert not kept.fits and kept.placement["optimizer_state"] is Tier.CXL and kept.spill_blocks == 22
    assert any("every streamed block spilled (m and v on cxl), and still over" in n for n in kept.notes)
    plan = recipe_plan("llama-7b.yaml", *sets, "offload.placement.master=auto")
    assert plan.fits and plan.placement["optimizer_state"] is plan.placement["master"] is Tier.CXL
    assert plan.get("master", Tier.CXL) > 0 and "(master cxl)" in plan.split()


def test_auto_spills_gradient_sums_to_cxl_last() -> None:
    """gradients auto: with micro-batches accumulated, when every streamed block's m, v and
    master on cxl still leave the host over budget, their gradient sums go there too."""
    every = recipe_plan(  # every streamed block's m, v and master on cxl, 4 micro-batches
        "llama-7b.yaml",
        "offload.placement.optimizer_state=cxl",
        "offload.placement.master=cxl",
        "offload.placement.spill_blocks=22",
        "offload.cxl_nodes=[0]",
        grad_accum=4,
    ).needed[Tier.HOST]
    sets = (
        "offload.placement.optimizer_state=auto",
        "offload.placement.master=auto",
        f"offload.budgets.host_bytes={every - 1}",
        "offload.cxl_nodes=[0]",
        "offload.budgets.cxl_bytes=512GiB",
    )
    kept = recipe_plan("llama-7b.yaml", *sets, grad_accum=4)  # gradients host (the recipe's)
    assert not kept.fits and kept.placement["gradients"] is Tier.HOST and kept.spill_blocks == 22
    plan = recipe_plan("llama-7b.yaml", *sets, "offload.placement.gradients=auto", grad_accum=4)
    assert plan.fits and plan.placement["master"] is plan.placement["gradients"] is Tier.CXL
    assert plan.get("grad_accum", Tier.CXL) > 0 and plan.spill_blocks <= 22
    assert any("gradient sums on cxl" in n for n in plan.notes)
    # Without accumulation no sums are made: m, v and masters on cxl fit, and gradients stay host.
    single = recipe_plan("llama-7b.yaml", *sets, "offload.placement.gradients=auto", grad_accum=1)
    assert single.fits and single.placement["gradients"] is Tier.HOST
    assert single.placement["master"] is Tier.CXL and single.get("grad_accum", Tier.CXL) == 0


def test_runtime_follows_the_plans_automatic_spill(disk_dir: Path) -> None:
    model = tiny("llama", layers=8)
    base = {"device": "cpu", "dtype": "bfloat16", "nvme_dirs": [str(disk_dir)]}

    def need(k: int) -> int:
        cfg = load_config(None, **base, placement={"optimizer_state": "nvme", "spill_blocks": k})
        return make_plan(model, cfg, batch_size=2, seq_len=16).needed[Tier.HOST]

    cfg = load_config(None, **base, placement={"optimizer_state": "auto"}, budgets={"host_bytes": need(6)})
    plan = make_plan(model, cfg, batch_size=2, seq_len=16)
    assert plan.spill_blocks == 6 and need(5) > need(6)  # the fewest that fit
    wrapped, _ = offload.wrap(model, cfg, plan=plan)
    rt = wrapped.runtime
    try:
        assert rt.plan is plan and rt.spilled == range(2, 8)
        assert plan.store_bytes(Tier.HOST) == sum(r.state_bytes() for r in rt.records())
        assert plan.store_bytes(Tier.NVME) == rt.state_tier.stored_bytes()
    finally:
        rt.close()


def test_runtime_without_a_plan_makes_one_without_the_batch_shape(disk_dir: Path) -> None:
    model = tiny("llama", layers=8)
    base = {"device": "cpu", "dtype": "bfloat16", "nvme_dirs": [str(disk_dir)]}
    forced = load_config(None, **base, placement={"optimizer_state": "nvme", "spill_blocks": 6})
    budget = make_plan(model, forced, batch_size=1, seq_len=1).needed[Tier.HOST]
    cfg = load_config(None, **base, placement={"optimizer_state": "auto"}, budgets={"host_bytes": budget})
    wrapped, _ = offload.wrap(model, cfg)
    rt = wrapped.runtime
    try:
        assert rt.plan.batch_size == rt.plan.seq_len == 1
        assert rt.plan.spill_blocks == 6 and rt.spilled == range(2, 8)
    finally:
        rt.close()


def test_device_blocks_auto_fits_the_gpu_budget_on_the_cpu() -> None:
    """On the CPU the gpu column is host RAM (counted there too), and a gpu budget, when given,
    still bounds it: auto takes the most blocks whose gpu need, residents on the device, fits
    the budget less the margin."""
    from offload.plan.planner import DEVICE_MARGIN_BYTES

    model = tiny("llama", layers=4)

    def gpu_need(k: int) -> int:
        cfg = load_config(None, device="cpu", placement={"device_blocks": k, "device_residents": True})
        return make_plan(model, cfg, batch_size=2, seq_len=16).needed[Tier.GPU]

    margin = DEVICE_MARGIN_BYTES + 2 * 16 * 96 * 6  # logits and their fp32 upcast, vocabulary 96
    cfg = load_config(
        None, device="cpu", placement={"device_blocks": "auto"}, budgets={"gpu_bytes": gpu_need(2) + margin}
    )
    plan = make_plan(model, cfg, batch_size=2, seq_len=16)
    assert (plan.device_blocks, plan.residents_on_device) == (2, True) and gpu_need(3) > gpu_need(2)
    assert any("device_blocks auto: 2" in n for n in plan.notes)
    wrapped, _ = offload.wrap(model, cfg, plan=plan)
    rt = wrapped.runtime
    assert [r.on_device for r in rt.blocks] == [True, True, False, False] and rt.resident is not None
    assert rt.resident.on_device
    assert plan.store_bytes(Tier.GPU) == sum(r.state_bytes() for r in rt.records() if r.on_device)
    rt.close()
    unbounded = make_plan(
        tiny("llama", layers=4), load_config(cfg, budgets={"gpu_bytes": None}), batch_size=2, seq_len=16
    )
    assert unbounded.device_blocks == 4 and any("no gpu budget" in n for n in unbounded.notes)
    tight = make_plan(
        tiny("llama", layers=4), load_config(cfg, budgets={"gpu_bytes": 1 << 20}), batch_size=2, seq_len=16
    )
    assert (tight.device_blocks, tight.residents_on_device) == (0, False)


def test_device_blocks_auto_needs_a_plan_with_the_batch_shape() -> None:
    with pytest.raises(
        ConfigError,
        match=r"placement\.device_blocks = 'auto': needs the batch shape.*plan=offload\.plan\.make_plan",
    ):
        offload.wrap(tiny("llama"), device="cpu", placement={"device_blocks": "auto"})


def test_a_plan_for_another_config_is_refused() -> None:
    model = tiny("llama")
    plan = make_plan(
        model, load_config(None, device="cpu", placement={"device_blocks": 1}), batch_size=2, seq_len=8
    )
    with pytest.raises(
        ValueError,
        match=r"the plan was made for another placement .*device_blocks=1.*make_plan\(model, config",
    ):
        offload.wrap(model, device="cpu", plan=plan)
    other = make_plan(tiny("llama", layers=2), load_config(None, device="cpu"), batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="the plan was made for another model"):
        offload.wrap(tiny("llama"), device="cpu", plan=other)


def test_cli_shows_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(
        str(REPO / "recipes" / "llama-7b.yaml"),
        "--no-detect",
        "--set",
        "offload.placement.optimizer_state=auto",
        "--set",
        "offload.budgets.host_bytes=60GiB",
        "--set",
        "offload.nvme_dirs=[/x]",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"optimizer_state: 10 blocks gpu, \d+ blocks host, \d+ blocks nvme\n", out), out
