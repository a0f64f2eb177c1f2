"""Property tests: random batches of reads and writes agree with an in-memory model of the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload.io as oio

FILE_BYTES = 256 << 10

# (offset, length, buffer misalignment) triples; writes in one batch must not overlap, since two
# concurrent writes to the same bytes have no defined order.
spans = st.lists(
    st.tuples(st.integers(0, FILE_BYTES - 1), st.integers(1, 40_000), st.sampled_from([0, 0, 1, 512, 4095])),
    min_size=1,
    max_size=24,
)


def disjoint(requests: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    taken = np.zeros(FILE_BYTES + 40_000, dtype=bool)
    out = []
    for off, n, mis in requests:
        if not taken[off : off + n].any():
            taken[off : off + n] = True
            out.append((off, n, mis))
    return out


def buffer(n: int, misalign: int) -> np.ndarray:
    raw = np.empty(n + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + misalign
    return raw[start : start + n]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(spans, min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_random_batches_match_model(engine: oio.Engine, disk_dir: Path, batches, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = np.zeros(FILE_BYTES + 40_000, dtype=np.uint8)
    end = 0
    with oio.open(disk_dir / "prop.bin", "w", engine=engine) as f:
        for batch in batches:
            reqs, datas = [], []
            for off, n, mis in disjoint(batch):
                buf = buffer(n, mis)
                buf[:] = rng.integers(0, 256, size=n, dtype=np.uint8)
                model[off : off + n] = buf
                end = max(end, off + n)
                reqs.append(oio.Write(f, buf, off))
                datas.append(buf)
            oio.wait_all(engine.submit(reqs))
            assert f.size() == end
            # Read back a random set of (possibly overlapping) ranges in one batch.
            reads = []
            for _ in range(8):
                off = int(rng.integers(0, end))
                n = int(rng.integers(1, end - off + 1))
                reads.append((off, buffer(n, int(rng.choice([0, 3, 4096 - 1])))))
            oio.wait_all(engine.submit([oio.Read(f, b, off) for off, b in reads]))
            for off, b in reads:
                np.testing.assert_array_equal(b, model[off : off + len(b)])
