"""Does a large host-to-device copy on one stream hold back a small one queued after it on another
stream? (It does on the H100: the copies run in the order they were queued, whatever their
streams, which is why the kept graphs come back in parts, offload/engine/activations.py.)

For a large copy (a kept graph: 3000 MB, whole or split in parts on its stream) and a small one
(a block's weights: 400 MB) queued after or before it on another stream, prints when each lands
(ms after both could start, the best of five) and writes JSON (--out):

    python scripts/probe_h2d_streams.py --out $OUT/h2d_streams.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from typing import Any

import torch

MB = 1 << 20


def landed(big_mb: int, small_mb: int, parts: int, small_first: bool, repeat: int = 5) -> dict[str, Any]:
    big = torch.empty(big_mb * MB, dtype=torch.uint8).pin_memory()
    small = torch.empty(small_mb * MB, dtype=torch.uint8).pin_memory()
    dbig, dsmall = torch.empty_like(big, device="cuda"), torch.empty_like(small, device="cuda")
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    step = -(-big.numel() // parts)
    best: dict[str, float] | None = None
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        a.wait_event(start)
        b.wait_event(start)
        ends = {"big": torch.cuda.Event(enable_timing=True), "small": torch.cuda.Event(enable_timing=True)}
        order = [("small", b), ("big", a)] if small_first else [("big", a), ("small", b)]
        for name, stream in order:
            with torch.cuda.stream(stream):
                if name == "big":
                    for i in range(0, big.numel(), step):
                        dbig[i : i + step].copy_(big[i : i + step], non_blocking=True)
                else:
                    dsmall.copy_(small, non_blocking=True)
                ends[name].record(stream)
        torch.cuda.synchronize()
        got = {name: start.elapsed_time(e) for name, e in ends.items()}
        if best is None or got["big"] + got["small"] < best["big"] + best["small"]:
            best = got
    assert best is not None
    return {
        "big_mb": big_mb,
        "small_mb": small_mb,
        "parts": parts,
        "small_first": small_first,
        "big_ms": best["big"],
        "small_ms": best["small"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-mb", type=int, default=3000)
    ap.add_argument("--small-mb", type=int, default=400)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = [landed(a.big_mb, a.small_mb, parts, first) for parts in (1, 4, 16) for first in (False, True)]
    alone = landed(a.small_mb, a.small_mb, 1, True)
    print(f"{'large copy':<18}{'queued first':<14}{'large lands':>12}{'small lands':>12}")
    for r in rows:
        first = "small" if r["small_first"] else "large"
        print(f"{r['parts']:>3} part(s){'':<8}{first:<14}{r['big_ms']:>9.1f} ms{r['small_ms']:>9.1f} ms")
    print(f"two {a.small_mb} MB copies: the second lands at {alone['big_ms']:.1f} ms")
    if a.out:
        out = {
            "date": date.today().isoformat(),
            "device": torch.cuda.get_device_name(),
            "host": platform.node(),
            "rows": rows,
            "two_small": alone,
        }
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
        print("written", a.out)


if __name__ == "__main__":
    main()
