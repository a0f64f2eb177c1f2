"""Entry point of the ``offload`` console command: parses, dispatches, turns errors into messages.

Each command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``;
this file only wires them together, so importing it loads neither torch nor the native engine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from offload._version import __version__
from offload.cli import CliError, bench_io, ckpt, doctor, plan, snapshot, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload",
        description="Memory-tier offloading runtime for training PyTorch models larger than the GPU.",
    )
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor.add_parser(commands)
    train.add_parser(commands)
    plan.add_parser(commands)
    ckpt.add_parser(commands)
    snapshot.add_parser(commands)
    bench = commands.add_parser("bench", help="measure this machine", description="Measure this machine.")
    bench_commands = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench_io.add_parser(bench_commands)
    bench.set_defaults(func=None, help_parser=bench)
    parser.set_defaults(func=None, help_parser=parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command in argv (default: sys.argv[1:]) and returns its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse has already printed
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.func is None:
        args.help_parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("offload: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
