"""What the commands that take a recipe share: its arguments, and reading it into a Recipe with
errors turned into CliError messages (a bad field is named, not a traceback)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from offload.cli import CliError

if TYPE_CHECKING:
    from offload.train.recipe import Recipe


def add_recipe_arguments(p: argparse.ArgumentParser, default: Path | None = None, example: str = "") -> None:
    if default is None:
        p.add_argument("recipe", help="recipe YAML")
    else:
        p.add_argument(
            "recipe", nargs="?", default=str(default), help=f"recipe YAML (default: {default.name})"
        )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe field, e.g. {example or '--set train.steps=20'}",
    )


def read_recipe(args: argparse.Namespace) -> Recipe:
    from offload.config import ConfigError
    from offload.train import load_recipe
    from offload.train.data import DataError

    path = Path(args.recipe)
    if not path.exists():
        raise CliError(f"recipe {path} does not exist")
    try:
        return load_recipe(path, args.overrides)
    except (ConfigError, DataError) as e:
        raise CliError(str(e)) from None
