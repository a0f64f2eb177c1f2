"""Times the erasure codec, per SIMD path, side by side with ISA-L's ec_encode_data on one core.

    python scripts/bench_codec.py --configs 8,2 4,2 10,4 --sizes 1 8 64

For each k,m and chunk size (MiB): encode (m parity chunks from k data chunks) and decode (the
first m data chunks lost, rebuilt from the other k - m data chunks and the m parity chunks, decode
matrix included), for each path of ``offload.snapshot.codec`` this CPU has and for ISA-L, each
with threads=1 into buffers allocated and touched beforehand. GB/s is data bytes (k x chunk) per
second, the median over repeats.

ISA-L is libisal loaded with ctypes: the system's (Debian's libisal2) or the copy in pyeclib's
wheel (``pip install pyeclib``); without either it is skipped with a message. It is given our
parity matrix (``ec_init_tables``) and its parity is checked equal to ours; our matrix is checked
to be its ``gf_gen_cauchy1_matrix`` with columns scaled to a first row of ones. Where libisal
exports its per-ISA entry points (ec_encode_data_avx2, ...) those are timed too.
Prints a table and writes JSON (default benchmarks/results/codec_<date>_<cpu>.json).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import glob
import json
import os
import platform
import re
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without pip install -e .

from offload.snapshot import codec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MIN_SECONDS = 0.3  # time each case at least this long (and at least 3 runs)
MAX_RUNS = 50

Bytes = ctypes.POINTER(ctypes.c_ubyte)


@dataclass(slots=True)
class Row:
    k: int
    m: int
    chunk_mib: float
    op: str  # encode or decode
    impl: str  # offload or isa-l
    isa: str
    seconds: float
    gbps: float  # data bytes (k x chunk) per second / 1e9


class IsaL:
    """libisal through ctypes: the erasure-code entry points the benchmark calls."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib, self.path = lib, path
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, Bytes, Bytes]
        lib.gf_gen_cauchy1_matrix.argtypes = [Bytes, ctypes.c_int, ctypes.c_int]
        lib.gf_invert_matrix.argtypes = [Bytes, Bytes, ctypes.c_int]
        lib.gf_invert_matrix.restype = ctypes.c_int
        self.variants: dict[str, Any] = {"dispatch": lib.ec_encode_data}
        # Per-ISA entry points that take ec_init_tables' layout (a GFNI build's tables differ).
        for isa in ("avx2", "avx512"):
            fn = getattr(lib, f"ec_encode_data_{isa}", None)
            if fn is not None:
                self.variants[isa] = fn
        for fn in self.variants.values():
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, Bytes, ctypes.c_void_p, ctypes.c_void_p]

    def tables(self, rows: np.ndarray) -> np.ndarray:
        """ec_init_tables for the rows x k coefficient matrix ``rows``."""
        n_rows, k = rows.shape
        rows = np.ascontiguousarray(rows)
        gftbls = np.zeros(k * n_rows * 32, dtype=np.uint8)
        self.lib.ec_init_tables(k, n_rows, _ptr(rows), _ptr(gftbls))
        return gftbls

    def cauchy1(self, k: int, m: int) -> np.ndarray:
        a = np.zeros((k + m, k), dtype=np.uint8)
        self.lib.gf_gen_cauchy1_matrix(_ptr(a), k + m, k)
        return a[k:]

    def invert(self, a: np.ndarray) -> np.ndarray:
        out = np.zeros_like(a)
        if self.lib.gf_invert_matrix(_ptr(np.ascontiguousarray(a)), _ptr(out), a.shape[0]) != 0:
            raise ValueError("singular matrix")
        return out


def _ptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(Bytes)


def _ptrs(arrays: list[np.ndarray]) -> Any:
    return (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))


def isal_candidates() -> Iterator[str]:
    name = ctypes.util.find_library("isal")
    if name:
        yield name
    for folder in ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        yield from sorted(glob.glob(f"{folder}/libisal.so*"))
    # pyeclib's manylinux wheel carries its own libisal next to liberasurecode.
    yield from sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "*.libs", "libisal*.so*")))


def find_isal() -> tuple[IsaL | None, str]:
    """ISA-L and where it came from, or None and why not."""
    tried = []
    for path in isal_candidates():
        try:
            lib = ctypes.CDLL(path)
            lib.ec_encode_data  # noqa: B018  (raises AttributeError when missing)
            return IsaL(lib, path), path
        except (OSError, AttributeError) as e:
            tried.append(f"{path}: {e}")
    why = "; ".join(tried) or "no libisal.so* on this system or in pyeclib's wheel"
    return None, f"not found ({why}): apt-get install libisal2, or pip install pyeclib"


def median_seconds(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first touch of the outputs, branch predictors
    times: list[float] = []
    while len(times) < 3 or (sum(times) < MIN_SECONDS and len(times) < MAX_RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_against_isal(isal: IsaL, k: int, m: int, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
    """Our matrix is ISA-L's Cauchy matrix, columns scaled; ISA-L computes our parity bit for bit."""
    ours = codec.parity_matrix(k, m)
    cauchy = isal.cauchy1(k, m)
    mul, _ = codec.field_tables()
    if not (mul[ours, cauchy[0][None, :]] == cauchy).all():
        raise SystemExit(f"k={k} m={m}: our matrix is not gf_gen_cauchy1_matrix with scaled columns")
    for name, fn in isal.variants.items():
        theirs = [np.empty_like(p) for p in parity]
        fn(len(data[0]), k, m, _ptr(isal.tables(ours)), _ptrs(data), _ptrs(theirs))
        if not all(np.array_equal(a, b) for a, b in zip(parity, theirs)):
            raise SystemExit(f"k={k} m={m}: ISA-L's parity ({name}) differs from ours")


def bench_case(k: int, m: int, nbytes: int, isal: IsaL | None, isas: list[str]) -> list[Row]:
    rng = np.random.default_rng(k * 1000 + m)
    data = [np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy() for _ in range(k)]
    parity = [np.ones(nbytes, dtype=np.uint8) for _ in range(m)]
    rebuilt = [np.ones(nbytes, dtype=np.uint8) for _ in range(k)]
    codec.encode(data, m, out=parity)
    lost = list(range(m))
    chunks: list[np.ndarray | None] = [None if i in lost else c for i, c in enumerate(data + parity)]
    rows: list[Row] = []

    def row(op: str, impl: str, isa: str, seconds: float) -> None:
        rows.append(Row(k, m, nbytes / 2**20, op, impl, isa, seconds, k * nbytes / seconds / 1e9))

    for isa in isas:
        encode = lambda isa=isa: codec.encode(data, m, out=parity, isa=isa)  # noqa: E731
        decode = lambda isa=isa: codec.decode(chunks, k, m, out=rebuilt, isa=isa)  # noqa: E731
        row("encode", "offload", isa, median_seconds(encode))
        row("decode", "offload", isa, median_seconds(decode))
        if any(not np.array_equal(rebuilt[i], data[i]) for i in lost):
            raise SystemExit(f"k={k} m={m} {isa}: decode did not restore the data")
    if isal is None:
        return rows
    check_against_isal(isal, k, m, data, parity)
    matrix = codec.parity_matrix(k, m)
    gftbls = isal.tables(matrix)
    data_ptrs, parity_ptrs = _ptrs(data), _ptrs(parity)
    survivors = [c for c in chunks if c is not None][:k]
    generator = np.vstack([np.eye(k, dtype=np.uint8), matrix])[
        [i for i, c in enumerate(chunks) if c is not None][:k]
    ]
    in_ptrs, out_ptrs = _ptrs(survivors), _ptrs(rebuilt[:m])

    for name, fn in isal.variants.items():

        def isal_encode(fn: Callable[..., None] = fn) -> None:
            fn(nbytes, k, m, _ptr(gftbls), data_ptrs, parity_ptrs)

        def isal_decode(fn: Callable[..., None] = fn) -> None:
            # As a decoder does per loss pattern: invert the survivors' rows, take the lost rows.
            rows_lost = isal.invert(generator)[lost]
            fn(nbytes, k, m, _ptr(isal.tables(rows_lost)), in_ptrs, out_ptrs)

        row("encode", "isa-l", name, median_seconds(isal_encode))
        row("decode", "isa-l", name, median_seconds(isal_decode))
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[Row]) -> str:
    head = f"{'k':>3} {'m':>2} {'chunk':>8}  {'impl':<8} {'isa':<12} {'encode GB/s':>11} {'decode GB/s':>11}"
    lines = [head, "-" * len(head)]
    cells: dict[tuple[int, int, float, str, str], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r.k, r.m, r.chunk_mib, r.impl, r.isa), {})[r.op] = r.gbps
    for (k, m, mib, impl, isa), ops in cells.items():
        lines.append(
            f"{k:>3} {m:>2} {mib:>5g} MiB  {impl:<8} {isa:<12}"
            f" {ops.get('encode', float('nan')):>11.2f} {ops.get('decode', float('nan')):>11.2f}"
        )
    return "\n".join(lines)


def parse_config(text: str) -> tuple[int, int]:
    k, _, m = text.partition(",")
    try:
        return int(k), int(m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a config is k,m (e.g. 8,2); got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", type=parse_config, nargs="+", default=[(8, 2), (4, 2), (10, 4)], help="k,m"
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 8, 64], help="chunk sizes in MiB")
    parser.add_argument(
        "--isa", nargs="+", default=None, help="our paths to time (default: all this CPU has)"
    )
    parser.add_argument("--no-isal", action="store_true", help="do not look for ISA-L")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON file (default {RESULTS}/codec_<date>_<cpu>.json)"
    )
    args = parser.parse_args(argv)

    info = codec.info()
    isas = args.isa or info["available"]
    isal, isal_note = (None, "skipped (--no-isal)") if args.no_isal else find_isal()
    print(f"offload codec paths: {', '.join(isas)} (this CPU has {', '.join(info['available'])})")
    print(f"ISA-L: {isal_note}" + (f"; entry points: {', '.join(isal.variants)}" if isal else ""))
    rows: list[Row] = []
    for k, m in args.configs:
        for mib in args.sizes:
            rows += bench_case(k, m, int(mib * 2**20), isal, isas)
            print(
                render([r for r in rows if (r.k, r.m, r.chunk_mib) == (k, m, mib)]).split("\n", 2)[-1],
                flush=True,
            )
    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "scripts/bench_codec.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release()},
        "threads": 1,
        "gbps": "data bytes (k x chunk) per second / 1e9, median of runs",
        "offload": info,
        "isal": {"path": isal.path, "entry_points": list(isal.variants)} if isal else {"skipped": isal_note},
        "results": [asdict(r) for r in rows],
    }
    print(render(rows))
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{cpu_model()} {info['isa']}".lower()).strip("-")
    path = args.out or RESULTS / f"codec_{now.date().isoformat()}_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
