"""``offload train RECIPE [--set key=value ...] [--resume [PATH]]``: run a training recipe
(recipes/tiny.yaml is the embedded default: a small model trained on the CPU on text that ships
with the repository). ``--resume`` continues from the newest checkpoint in the recipe's
train.checkpoint_dir, ``--resume PATH`` from that checkpoint (a step directory or a root), exactly
where it stopped; a checkpoint of another model or recipe is refused, naming what differs."""

from __future__ import annotations

import argparse
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from offload.checkpoint.format import CheckpointError
    from offload.config import ConfigError
    from offload.train.data import DataError
    from offload.train.trainer import train

    recipe = read_recipe(args)
    path = Path(args.recipe)
    print(
        f"offload train: {recipe.name} ({path}), {recipe.train.steps} steps on {recipe.offload.resolve_device()}"
    )
    try:
        summary = train(recipe, trace=args.trace, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as e:
        raise CliError(str(e)) from None
    print(summary.render())
    return 0
