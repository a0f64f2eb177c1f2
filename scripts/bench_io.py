"""Runs ``offload bench io`` and files the JSON under benchmarks/results/io_<size>_<date>_<device>.json.

    python scripts/bench_io.py --dir /mnt/nvme --size 4GiB

<device> is the GPU name as a slug (nvidia-h100-80gb-hbm3) or cpu-<kernel release> without one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without pip install -e .

from offload.cli import CliError, bench_io  # noqa: E402
from offload.utils.sizes import format_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def device_slug(host: dict[str, object]) -> str:
    name = str(host["gpu"]) if host.get("gpu") else f"cpu-{host['kernel']}"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bench_io.add_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})")
    args = parser.parse_args(argv)
    try:
        result = bench_io.run_bench(bench_io.config_from_args(args))
    except (CliError, OSError) as e:
        print(f"bench_io: error: {e}", file=sys.stderr)
        return 2
    print(bench_io.render(result))
    size = format_bytes(result["size"]).replace(" ", "")
    path = args.out / f"io_{size}_{result['date'][:10]}_{device_slug(result['host'])}.json"
    bench_io.write_json(result, path)
    print(f"results written to {path}")
    return bench_io.report_failures(result)


if __name__ == "__main__":
    sys.exit(main())
