"""Times the erasure codec, per SIMD path, side by side with ISA-L's ec_encode_data on one core.

    python scripts/bench_codec.py --configs 8,2 4,2 10,4 --sizes 1 8 64

For each k,m and chunk size (MiB): encode (m parity chunks from k data chunks) and decode (the
first m data chunks lost, rebuilt from the other k - m data chunks and the m parity chunks, decode
matrix included), for each path of ``offload.snapshot.codec`` this CPU has and for ISA-L, each
with threads=1 into buffers allocated and touched beforehand; each is checked to compute the right
bytes first. The implementations are timed in rounds (each once a round, in a shuffled order, at
least 5 rounds), so that other work on the machine falls on all of them alike. GB/s is data bytes (k x chunk) over
the fastest run (other work only ever slows a run; the median is kept in the JSON too).

ISA-L is libisal loaded with ctypes: every copy found, the system's (Debian's libisal2) and the one
in pyeclib's wheel (``pip install pyeclib``, a newer ISA-L with GFNI kernels); without either it is
skipped with a message. It is given our parity matrix (``ec_init_tables``) and its parity is
checked equal to ours; our matrix is checked to be its ``gf_gen_cauchy1_matrix`` with columns
scaled to a first row of ones. The per-ISA entry points a library exports (ec_encode_data_avx2,
...) are timed too, where this CPU has that ISA.
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
import random
import re
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without pip install -e .

from offload.snapshot import codec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MIN_RUNS, MAX_RUNS = 5, 200  # rounds of runs (every implementation once a round)
MIN_SECONDS = 0.1  # the quickest implementation's total, before MIN_RUNS rounds can stop

Bytes = ctypes.POINTER(ctypes.c_ubyte)


@dataclass(slots=True)
class Row:
    k: int
    m: int
    chunk_mib: float
    op: str  # encode or decode
    impl: str  # offload or isa-l
    isa: str
    seconds: float  # fastest run
    median_seconds: float
    gbps: float  # data bytes (k x chunk) / fastest run / 1e9


class IsaL:
    """libisal through ctypes: the erasure-code entry points the benchmark calls."""

    def __init__(self, lib: ctypes.CDLL, path: str, cpu_has: list[str]) -> None:
        self.lib, self.path = lib, path
        self.version = isal_version(path)
        lib.gf_gen_cauchy1_matrix.argtypes = [Bytes, ctypes.c_int, ctypes.c_int]
        lib.gf_invert_matrix.argtypes = [Bytes, Bytes, ctypes.c_int]
        lib.gf_invert_matrix.restype = ctypes.c_int
        base_init = getattr(lib, "ec_init_tables_base", lib.ec_init_tables)
        # name -> (encode entry point, the table builder whose layout it reads, our path it needs):
        # the per-ISA entry points are exported by the library, not chosen by the CPU, so each is
        # only called where this CPU has that ISA.
        wanted = {
            "dispatch": ("ec_encode_data", lib.ec_init_tables, "scalar"),
            "avx2": ("ec_encode_data_avx2", base_init, "avx2"),
            "avx512": ("ec_encode_data_avx512", base_init, "avx512"),
            "avx512_gfni": ("ec_encode_data_avx512_gfni", getattr(lib, "ec_init_tables_gfni", None), "gfni"),
        }
        self.variants: dict[str, tuple[Any, Any]] = {}
        for name, (symbol, init, needs) in wanted.items():
            encode = getattr(lib, symbol, None)
            if encode is None or init is None or needs not in cpu_has:
                continue
            encode.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                Bytes,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
            init.argtypes = [ctypes.c_int, ctypes.c_int, Bytes, Bytes]
            self.variants[name] = (encode, init)

    @property
    def label(self) -> str:
        return f"isa-l {self.version}"

    def tables(self, variant: str, rows: np.ndarray) -> np.ndarray:
        """The variant's table builder (ec_init_tables or a per-ISA one) for the coefficients ``rows``."""
        n_rows, k = rows.shape
        rows = np.ascontiguousarray(rows)
        gftbls = np.zeros(k * n_rows * 32, dtype=np.uint8)  # 32 bytes a coefficient at most (GFNI: 8)
        self.variants[variant][1](k, n_rows, _ptr(rows), _ptr(gftbls))
        return gftbls

    def cauchy1(self, k: int, m: int) -> np.ndarray:
        a = np.zeros((k + m, k), dtype=np.uint8)
        self.lib.gf_gen_cauchy1_matrix(_ptr(a), k + m, k)
        return a[k:]

    def invert(self, a: np.ndarray) -> np.ndarray:
        out = np.zeros_like(a)
        work = a.copy()  # gf_invert_matrix reduces its input in place
        if self.lib.gf_invert_matrix(_ptr(work), _ptr(out), a.shape[0]) != 0:
            raise ValueError("singular matrix")
        return out


def _ptr(a: np.ndarray) -> Any:
    return a.ctypes.data_as(Bytes)


def _ptrs(arrays: list[np.ndarray]) -> Any:
    return (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))


def isal_candidates() -> Iterator[str]:
    for folder in ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        yield from sorted(glob.glob(f"{folder}/libisal.so*"))
    # pyeclib's manylinux wheel carries its own libisal next to liberasurecode.
    yield from sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "*.libs", "libisal*.so*")))
    name = ctypes.util.find_library("isal")  # elsewhere on the loader's path
    if name:
        yield name


def isal_version(path: str) -> str:
    """From the build path compiled into the library (isa-l-2.32.0), else the file name (.so.2.0.30)."""
    try:
        resolved = ctypes.util.find_library(path) or path
        found = re.search(rb"isa-l-(\d+\.\d+(?:\.\d+)?)", Path(os.path.realpath(resolved)).read_bytes())
        if found:
            return found.group(1).decode()
    except OSError:
        pass
    tail = re.search(r"\.so\.(\d+)\.\d+\.(\d+)$", os.path.realpath(path))
    return f"{tail.group(1)}.{tail.group(2)}" if tail else "?"


def find_isal(cpu_has: list[str]) -> tuple[list[IsaL], str]:
    """Every distinct ISA-L found (the system's, pyeclib's), and a line saying what was found."""
    found: dict[int | None, IsaL] = {}  # by the address of ec_encode_data: one entry per loaded library
    tried = []
    for path in isal_candidates():
        try:
            lib = ctypes.CDLL(path)
            address = ctypes.cast(lib.ec_encode_data, ctypes.c_void_p).value
        except (OSError, AttributeError) as e:
            tried.append(f"{path}: {e}")
            continue
        if address not in found:
            found[address] = IsaL(lib, path, cpu_has)
    libs = list(found.values())
    if libs:
        return libs, "; ".join(f"{f.label} at {f.path} ({', '.join(f.variants)})" for f in libs)
    why = "; ".join(tried) or "no libisal.so* on this system or in pyeclib's wheel"
    return [], f"not found ({why}): apt-get install libisal2, or pip install pyeclib"


Case = tuple[str, str, str]  # op, impl, isa


def time_interleaved(fns: dict[Case, Callable[[], object]]) -> dict[Case, tuple[float, float]]:
    """(fastest, median) seconds of each fn, timed in rounds that run every fn once in a shuffled
    order, so that other load on the machine falls on all of them alike: MIN_RUNS rounds at least,
    then more until the quickest fn has run MIN_SECONDS in all, or MAX_RUNS rounds."""
    times: dict[Case, list[float]] = {case: [] for case in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    while True:
        shuffle(order)  # what ran just before (and left in the caches) changes from round to round
        for case in order:
            t0 = time.perf_counter()
            fns[case]()
            times[case].append(time.perf_counter() - t0)
        rounds = len(next(iter(times.values())))
        quickest = min(sum(t) for t in times.values())
        if rounds >= MAX_RUNS or (rounds >= MIN_RUNS and quickest >= MIN_SECONDS):
            return {case: (min(t), statistics.median(t)) for case, t in times.items()}


def check_against_isal(isal: IsaL, k: int, m: int, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
    """Our matrix is ISA-L's Cauchy matrix, columns scaled; ISA-L computes our parity bit for bit."""
    ours = codec.parity_matrix(k, m)
    cauchy = isal.cauchy1(k, m)
    mul, _ = codec.field_tables()
    if not (mul[ours, cauchy[0][None, :]] == cauchy).all():
        raise SystemExit(f"k={k} m={m}: our matrix is not gf_gen_cauchy1_matrix with scaled columns")
    for name, (encode, _) in isal.variants.items():
        theirs = [np.empty_like(p) for p in parity]
        encode(len(data[0]), k, m, _ptr(isal.tables(name, ours)), _ptrs(data), _ptrs(theirs))
        if not all(np.array_equal(a, b) for a, b in zip(parity, theirs)):
            raise SystemExit(f"k={k} m={m}: {isal.label} {name} computes other parity than ours")


def bench_case(k: int, m: int, nbytes: int, isals: list[IsaL], isas: list[str]) -> list[Row]:
    rng = np.random.default_rng(k * 1000 + m)
    data = [np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy() for _ in range(k)]
    parity = [np.ones(nbytes, dtype=np.uint8) for _ in range(m)]
    rebuilt = [np.ones(nbytes, dtype=np.uint8) for _ in range(k)]
    want: list[np.ndarray] = [np.asarray(p) for p in codec.encode(data, m, isa="scalar")]
    lost = list(range(m))
    chunks: list[np.ndarray | None] = [None if i in lost else c for i, c in enumerate(data + want)]
    fns: dict[Case, Callable[[], object]] = {}
    for isa in isas:
        fns["encode", "offload", isa] = partial(codec.encode, data, m, out=parity, isa=isa)
        fns["decode", "offload", isa] = partial(codec.decode, chunks, k, m, out=rebuilt, isa=isa)

    # ISA-L's decode: the rows of the survivors' generator matrix, inverted; the lost data's rows
    # of the inverse are the coefficients, applied to the survivors.
    alive = [i for i, c in enumerate(chunks) if c is not None][:k]
    generator = np.vstack([np.eye(k, dtype=np.uint8), codec.parity_matrix(k, m)])[alive]
    data_ptrs, parity_ptrs = _ptrs(data), _ptrs(parity)
    in_ptrs, out_ptrs = _ptrs([data[i] if i < k else want[i - k] for i in alive]), _ptrs(rebuilt[:m])
    for isal in isals:
        check_against_isal(isal, k, m, data, want)
        for name, (encode_fn, _) in isal.variants.items():
            gftbls = isal.tables(name, codec.parity_matrix(k, m))

            def isal_encode(fn: Any = encode_fn, tables: np.ndarray = gftbls) -> None:
                fn(nbytes, k, m, _ptr(tables), data_ptrs, parity_ptrs)

            def isal_decode(fn: Any = encode_fn, name: str = name, isal: IsaL = isal) -> None:
                # The decode matrix per call, as a decoder meeting a new loss pattern builds it.
                fn(nbytes, k, m, _ptr(isal.tables(name, isal.invert(generator)[lost])), in_ptrs, out_ptrs)

            fns["encode", isal.label, name] = isal_encode
            fns["decode", isal.label, name] = isal_decode

    for (op, impl, isa), fn in fns.items():  # each checked once, which also warms it up
        outputs, expected = (parity, want) if op == "encode" else (rebuilt[:m], data[:m])
        for buf in outputs:
            buf.fill(1)
        fn()
        if not all(np.array_equal(a, b) for a, b in zip(outputs, expected)):
            raise SystemExit(f"k={k} m={m}: {impl} {isa} {op} computed wrong bytes")
    return [
        Row(k, m, nbytes / 2**20, op, impl, isa, fastest, median, k * nbytes / fastest / 1e9)
        for (op, impl, isa), (fastest, median) in time_interleaved(fns).items()
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[Row]) -> str:
    head = f"{'k':>3} {'m':>2} {'chunk':>8}  {'impl':<11} {'isa':<12} {'encode GB/s':>11} {'decode GB/s':>11}"
    lines = [head, "-" * len(head)]
    cells: dict[tuple[int, int, float, str, str], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r.k, r.m, r.chunk_mib, r.impl, r.isa), {})[r.op] = r.gbps
    for (k, m, mib, impl, isa), ops in cells.items():
        lines.append(
            f"{k:>3} {m:>2} {mib:>5g} MiB  {impl:<11} {isa:<12}"
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
    isals, isal_note = ([], "skipped (--no-isal)") if args.no_isal else find_isal(info["available"])
    print(f"offload codec paths: {', '.join(isas)} (this CPU has {', '.join(info['available'])})")
    print(f"ISA-L: {isal_note}")
    rows: list[Row] = []
    for k, m in args.configs:
        for mib in args.sizes:
            rows += bench_case(k, m, int(mib * 2**20), isals, isas)
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
        "gbps": "data bytes (k x chunk) / fastest run / 1e9 (median_seconds kept too)",
        "offload": info,
        "isal": [{"version": f.version, "path": f.path, "entry_points": list(f.variants)} for f in isals]
        or {"skipped": isal_note},
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
