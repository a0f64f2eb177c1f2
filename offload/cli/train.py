"""``offload train RECIPE [--set key=value ...] [--resume [PATH]]``: run a training recipe
(recipes/tiny.yaml is the embedded default: a small model trained on the CPU on text that ships
with the repository). ``--resume`` continues from the newest checkpoint in the recipe's
train.checkpoint_dir, ``--resume PATH`` from that checkpoint (a step directory or a root), exactly
where it stopped; a checkpoint of another model or recipe is refused, naming what differs. With
train.snapshot set, a run also starts from its job's newest in-memory snapshot (docs/snapshot.md).
``--nproc N`` runs it on N ranks of this machine through torchrun (docs/distributed.md; for
several machines see scripts/launch.sh)."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from offload.cli import CliError
from offload.cli._recipe import add_recipe_arguments, read_recipe

DEFAULT = Path(__file__).resolve().parent.parent.parent / "recipes" / "tiny.yaml"


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="run a training recipe", description=__doc__)
    add_recipe_arguments(p, DEFAULT, "--set train.steps=20 --set offload.device=cpu")
    p.add_argument("--trace", default=None, metavar="PATH", help="write a Chrome-trace JSON timeline to PATH")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue from the newest checkpoint in train.checkpoint_dir, or from PATH (put it after the recipe)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="ranks on this machine (torchrun --standalone); the store is sharded over them",
    )
    p.set_defaults(func=run)


def launch(args: argparse.Namespace) -> int:
    """Runs this same command on args.nproc ranks under torchrun and returns its exit status."""
    again = ["train", args.recipe, *(x for kv in args.overrides for x in ("--set", kv))]
    if args.trace:
        again += ["--trace", args.trace]
    if args.resume:
        again += ["--resume"] + ([] if args.resume is True else [str(args.resume)])
    from offload.train.ranks import torchrun

    print(f"offload train: {args.nproc} ranks through torchrun", flush=True)
    return subprocess.call([*torchrun(args.nproc), "-m", "offload.cli.main", *again])


def run(args: argparse.Namespace) -> int:
    from offload.checkpoint.format import CheckpointError
    from offload.config import ConfigError
    from offload.plan import PlanError
    from offload.train.data import DataError
    from offload.train.trainer import train

    if args.nproc < 1:
        raise CliError(f"--nproc {args.nproc}: must be >= 1")
    recipe = read_recipe(args)  # a bad recipe is refused before any rank starts
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args)
    path = Path(args.recipe)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if main:
        device = recipe.offload.resolve_device()
        print(f"offload train: {recipe.name} ({path}), {recipe.train.steps} steps on {device}")
    try:
        summary = train(recipe, trace=args.trace, resume=args.resume)
    except (ConfigError, DataError, CheckpointError, PlanError) as e:
        raise CliError(str(e)) from None
    if main:
        print(summary.render())
    return 0
