"""``offload plan RECIPE [--set key=value ...] [--json]``: the recipe's placement plan, bytes per
kind of state and tier against the budgets, computed on the meta device (nothing is allocated).
Exits 1 when the plan does not fit, naming per tier the need, the budget and what would fit."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from offload.cli import CliError
from offload.cli._recipe import add_recipe_arguments, read_recipe

if TYPE_CHECKING:
    from offload.plan import Plan
    from offload.plan.measure import Rates


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="print a recipe's placement plan", description=__doc__)
    add_recipe_arguments(p, example="--set offload.budgets.host_bytes=64GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="ranks of the job (torchrun): streamed state is sharded over them",
    )
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="ranks on this host (default: all of them)"
    )
    p.add_argument(
        "--no-detect",
        dest="detect",
        action="store_false",
        help="budgets left null are unbounded (default: read them from this machine)",
    )
    p.add_argument(
        "--link-gbs",
        type=float,
        default=None,
        help="host link GB/s each way for offload_saved's choice (default: measured on CUDA, else 25)",
    )
    p.add_argument(
        "--tflops",
        type=float,
        default=None,
        help="matmul TFLOPS for offload_saved's choice, attention at half (default: measured on CUDA, else 300)",
    )
    p.add_argument(
        "--adam-gps",
        type=float,
        default=None,
        help="CPU AdamW billions of parameters per second, offload_saved's CPU bound "
        "(default: measured on CUDA, else 5)",
    )
    p.add_argument(
        "--memory-gbs",
        type=float,
        default=None,
        help="device memory GB/s (a copy's reads and writes), the rate of each block's element-wise "
        "work in offload_saved's choice (default: measured on CUDA, else 2000)",
    )
    p.add_argument(
        "--disk-gbs",
        type=float,
        default=None,
        help="disk GB/s each way for boundary states on nvme, in offload_saved's choice "
        "(default: measured in nvme_dirs[0] when detecting, else 2)",
    )
    p.add_argument(
        "--snapshot-nodes",
        type=int,
        default=None,
        help="count in-memory snapshots (offload.snapshot) over this many nodes (keepers)",
    )
    p.add_argument(
        "--snapshot-parity", type=int, default=None, help="their parity m (default 1, 0 on one node)"
    )
    p.add_argument("--snapshot-buffers", type=int, default=2, help="segments per rank (default 2)")
    p.set_defaults(func=run)


def _rates(args: argparse.Namespace) -> Rates | None:
    """The rates given on the command line, the others assumed; None when none is given. A
    --link-gbs link has no duplex limit; --tflops sets the attention rate to half the matmul's;
    --disk-gbs sets the disk's rate both ways."""
    from dataclasses import replace

    from offload.plan.activations import ASSUMED

    given = (
        ("--link-gbs", args.link_gbs),
        ("--tflops", args.tflops),
        ("--adam-gps", args.adam_gps),
        ("--memory-gbs", args.memory_gbs),
        ("--disk-gbs", args.disk_gbs),
    )
    if all(value is None for _, value in given):
        return None
    for name, value in given:
        if value is not None and value <= 0:
            raise CliError(f"{name} {value}: must be > 0")
    rates = ASSUMED
    if args.link_gbs is not None:
        rates = replace(rates, h2d_bytes_s=args.link_gbs * 1e9, d2h_bytes_s=args.link_gbs * 1e9)
    if args.tflops is not None:
        rates = replace(rates, flops=args.tflops * 1e12, attention_flops=args.tflops * 0.5e12)
    if args.adam_gps is not None:
        rates = replace(rates, adam_params_s=args.adam_gps * 1e9)
    if args.memory_gbs is not None:
        rates = replace(rates, memory_bytes_s=args.memory_gbs * 1e9)
    if args.disk_gbs is not None:
        rates = replace(rates, disk_write_bytes_s=args.disk_gbs * 1e9, disk_read_bytes_s=args.disk_gbs * 1e9)
    return rates


def _snapshot(args: argparse.Namespace) -> float:
    """The keeper's memory as a multiple of the state (0: no --snapshot-nodes)."""
    if args.snapshot_nodes is None:
        return 0.0
    from offload.snapshot.config import memory_factor

    return memory_factor(args.snapshot_nodes, args.snapshot_parity, args.snapshot_buffers)


def _with_snapshot_note(plan: Plan, args: argparse.Namespace) -> Plan:
    """The plan with a note on how its snapshot row comes about: the code and its (k + m) / k."""
    from dataclasses import replace

    from offload.config import Tier
    from offload.snapshot.config import memory_note

    row = plan.get("snapshot", Tier.HOST)
    note = memory_note(args.snapshot_nodes, args.snapshot_parity, args.snapshot_buffers, row)
    return replace(plan, notes=(*plan.notes, note))


def run(args: argparse.Namespace) -> int:
    from offload.config import ConfigError
    from offload.model.discovery import UnsupportedModelError
    from offload.model.hf import build_on_meta
    from offload.plan import make_plan
    from offload.train.recipe import build_hf_config
    from offload.train.tokenizer import load_tokenizer

    recipe = read_recipe(args)
    try:
        tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.model.path)
        model = build_on_meta(build_hf_config(recipe.model, tokenizer.vocab_size, eos_id=tokenizer.eos_id))
        t = recipe.train
        plan = make_plan(
            model,
            recipe.offload,
            batch_size=t.batch_size,
            seq_len=t.seq_len,
            grad_accum=t.grad_accum,
            world_size=args.world_size,
            local_ranks=args.nproc_per_node,
            detect=args.detect,
            rates=_rates(args),
            snapshot=_snapshot(args),
            loss_chunk=t.loss_chunk,
        )
    except (ConfigError, UnsupportedModelError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.snapshot_nodes is not None:
        plan = _with_snapshot_note(plan, args)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(plan.table())
    if not plan.fits:
        for problem in plan.problems:
            print(f"offload plan: does not fit: {problem}", file=sys.stderr)
        return 1
    return 0
