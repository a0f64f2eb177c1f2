"""Tests for offload.engine.cpu_adam: the fused AdamW kernel against torch._fused_adamw_.

Tolerance: none. For fp32 gradients the kernel repeats the rounding of torch's fused CPU kernel,
so masters and both moments are compared bit for bit. The reference runs torch on buffers padded
to a multiple of 64 elements on one thread, so that every real element goes through torch's vector
loop; torch's scalar remainder loop rounds exp_avg_sq differently (see csrc/core/adamw.cpp), and
test_torch_remainder_loop_is_the_only_difference pins that down to within rtol 1e-6.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from offload import _C
from offload.engine.cpu_adam import fused_adamw_

HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}
SIZES = [1, 7, 63, 64, 65, 1000, 4099, 100_003]
X86 = platform.machine() in ("x86_64", "AMD64")
FMA_TORCH = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
exact = pytest.mark.skipif(
    not (X86 and FMA_TORCH),
    reason="bitwise match is established for x86-64 with torch's AVX2/AVX-512 kernels",
)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_step(p, m, v, g, *, step, pad=True, **hp):
    """torch._fused_adamw_ in place on p, m, v with the fp32 gradient g."""
    n = p.numel()
    extra = -n % 64 if pad else 0
    bufs = [torch.cat([t, torch.zeros(extra)]) for t in (p, m, v, g)]
    with one_torch_thread():
        torch._fused_adamw_(
            [bufs[0]],
            [bufs[3]],
            [bufs[1]],
            [bufs[2]],
            [],
            [torch.tensor(float(step))],
            amsgrad=False,
            maximize=False,
            **hp,
        )
    for dst, src in zip((p, m, v), bufs):
        dst.copy_(src[:n])


def state(n: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen) * scale
    m = torch.randn(n, generator=gen) * 0.01 * scale
    v = torch.rand(n, generator=gen) * 1e-4 * scale * scale
    return p, m, v


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_bitwise(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (bits(ours) != bits(ref)).nonzero().flatten()
    assert diff.numel() == 0, f"{what}: {diff.numel()} elements differ, first at {diff[:5].tolist()}"


@exact
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_fp32_grads_match_torch_bitwise(n, weight_decay, beta1):
    # beta1 = 0.3 takes torch's other lerp form (weight 1 - beta1 >= 0.5).
    hp = {**HP, "weight_decay": weight_decay, "beta1": beta1}
    p, m, v = state(n, seed=n)
    ref = [t.clone() for t in (p, m, v)]
    gen = torch.Generator().manual_seed(1000 + n)
    for step in range(1, 6):
        g = torch.randn(n, generator=gen)
        fused_adamw_(p, m, v, g, step=step, threads=3, **hp)
        torch_step(*ref, g, step=step, **hp)
    for ours, theirs, name in zip((p, m, v), ref, ("master", "exp_avg", "exp_avg_sq")):
        assert_bitwise(ours, theirs, name)


@exact
@pytest.mark.parametrize("n", [1, 65, 4099])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37, 1e-3])
def test_bf16_grads_match_torch_on_upcast_grads(n, grad_scale):
    p, m, v = state(n, seed=7)
    ref = [t.clone() for t in (p, m, v)]
    wire = torch.empty(n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(8)
    for step in range(1, 4):
        g = (torch.randn(n, generator=gen) * 3).to(torch.bfloat16)
        fused_adamw_(p, m, v, g, step=step, grad_scale=grad_scale, wire=wire, **HP)
        torch_step(*ref, g.float() * grad_scale, step=step, **HP)
    for ours, theirs, name in zip((p, m, v), ref, ("master", "exp_avg", "exp_avg_sq")):
        assert_bitwise(ours, theirs, name)
    assert_bitwise(wire, p.to(torch.bfloat16), "wire")


@exact
@pytest.mark.parametrize("case", ["tiny", "zero_grad", "huge_step"])
def test_edge_values_match_torch(case):
    n = 333
    if case == "tiny":  # subnormal moments and gradients: no flush to zero anywhere
        p, m, v = state(n, seed=3, scale=1e-19)
        grads = [torch.randn(n) * 1e-38 for _ in range(3)]
    elif case == "zero_grad":
        p, m, v = state(n, seed=4)
        grads = [torch.zeros(n) for _ in range(3)]
    else:  # step counts beyond float precision: torch reads the step as a float
        p, m, v = state(n, seed=5)
        grads = [torch.randn(n) for _ in range(3)]
    first = 2**24 + 1 if case == "huge_step" else 1
    ref = [t.clone() for t in (p, m, v)]
    for i, g in enumerate(grads):
        fused_adamw_(p, m, v, g, step=first + i, **HP)
        torch_step(*ref, g, step=first + i, **HP)
    for ours, theirs, name in zip((p, m, v), ref, ("master", "exp_avg", "exp_avg_sq")):
        assert_bitwise(ours, theirs, name)


@exact
def test_torch_remainder_loop_is_the_only_difference():
    # Unpadded, torch's last n % 8 elements go through its scalar loop, which fuses
    # v * beta2 + (1 - beta2) * g * g the other way round; everything else is bitwise equal.
    n = 1000 + 5
    p, m, v = state(n, seed=11)
    ref = [t.clone() for t in (p, m, v)]
    for step in range(1, 4):
        g = torch.randn(n)
        fused_adamw_(p, m, v, g, step=step, **HP)
        torch_step(*ref, g, step=step, pad=False, **HP)
    body = slice(0, n - n % 8)
    for ours, theirs, name in zip((p, m, v), ref, ("master", "exp_avg", "exp_avg_sq")):
        assert_bitwise(ours[body], theirs[body], name)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_wire_is_master_rounded_to_bf16_for_random_data():
    n = 4099
    p, m, v = state(n, seed=12)
    wire = torch.full((n,), 7.0, dtype=torch.bfloat16)
    fused_adamw_(p, m, v, torch.randn(n), step=1, wire=wire, **HP)
    assert_bitwise(wire, p.to(torch.bfloat16), "wire")


SPECIAL_BITS = [
    0x7FC00000,  # quiet NaN
    0xFFC00000,  # negative quiet NaN
    0x7F800001,  # signalling NaN whose payload would round into the exponent
    0x7FFFFFFF,  # NaN that naive rounding carries into the sign
    0x7F800000,  # inf
    0xFF800000,  # -inf
    0x7F7FFFFF,  # largest float: rounds up to inf
    0xFF7FFFFF,  # rounds down to -inf
    0x7F7F7FFF,  # just below the halfway point: stays finite
    0x3F808000,  # tie, even below: rounds down
    0x3F818000,  # tie, odd below: rounds up
    0x3F808001,  # just above the tie: rounds up
    0x00000001,  # smallest subnormal: rounds to zero
    0x80000000,  # -0.0
    0x00000000,
]


def test_wire_rounding_of_special_values():
    # lr = 0, zero moments and gradients: the update leaves every master bit pattern as it was
    # (signalling NaNs come back quieted), so the wire copy sees exactly these values.
    raw = torch.tensor(SPECIAL_BITS * 9, dtype=torch.int64)
    master = raw.to(torch.int32).view(torch.float32).clone()
    n = master.numel()
    wire = torch.zeros(n, dtype=torch.bfloat16)
    zeros = [torch.zeros(n) for _ in range(3)]
    fused_adamw_(
        master, zeros[0], zeros[1], zeros[2], step=1, wire=wire, **{**HP, "lr": 0.0, "weight_decay": 0.0}
    )
    if X86 and FMA_TORCH:
        assert_bitwise(wire, master.to(torch.bfloat16), "wire")
    w = bits(wire).to(torch.int32) & 0xFFFF
    expect = {
        0x7F800000: 0x7F80,
        0xFF800000: 0xFF80,
        0x7F7FFFFF: 0x7F80,
        0xFF7FFFFF: 0xFF80,
        0x7F7F7FFF: 0x7F7F,
    }
    expect |= {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81, 0x00000001: 0, 0x80000000: 0x8000}
    for i, b in enumerate(SPECIAL_BITS):
        if i < 4:
            assert torch.isnan(wire[i]), f"NaN {b:#x} became {int(w[i]):#x}"
        else:
            assert int(w[i]) == expect.get(b, 0), f"{b:#x} -> {int(w[i]):#x}"


def test_threads_do_not_change_results():
    n = 200_003  # several 32768-element chunks, not a multiple of 64
    first = list(state(n, seed=13))
    second = [t.clone() for t in first]
    wires = [torch.empty(n, dtype=torch.bfloat16) for _ in range(2)]
    for step in range(1, 4):
        g = torch.randn(n).to(torch.bfloat16)
        fused_adamw_(*first, g, step=step, wire=wires[0], threads=1, grad_scale=0.5, **HP)
        fused_adamw_(*second, g, step=step, wire=wires[1], threads=4, grad_scale=0.5, **HP)
    for a, b, name in zip(
        [*first, wires[0]], [*second, wires[1]], ("master", "exp_avg", "exp_avg_sq", "wire")
    ):
        assert_bitwise(a, b, name)


def test_empty_tensors_are_a_no_op():
    e = torch.empty(0)
    fused_adamw_(e, e.clone(), e.clone(), e.clone(), step=1, wire=torch.empty(0, dtype=torch.bfloat16), **HP)


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


ISA_FLAGS = {
    "default": set(),
    "avx2": {"avx2", "fma"},
    "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"},
}

ISA_PROBE = r"""
import hashlib, json, torch
from test_cpu_adam import HP, assert_bitwise, state, torch_step
from offload.engine.cpu_adam import fused_adamw_
n = 4099
p, m, v = state(n, seed=21)
ref = [t.clone() for t in (p, m, v)]
wire = torch.empty(n, dtype=torch.bfloat16)
for step in range(1, 4):
    g = torch.randn(n, generator=torch.Generator().manual_seed(step))
    if step == 3:
        g[:5] = float("nan")
    fused_adamw_(p, m, v, g, step=step, wire=wire, **HP)
    torch_step(*ref, g, step=step, **HP)
for ours, theirs, name in zip((p, m, v), ref, ("master", "exp_avg", "exp_avg_sq")):
    assert_bitwise(ours, theirs, name)
assert_bitwise(wire, p.to(torch.bfloat16), "wire")
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (p, m, v, wire.view(torch.int16)))).hexdigest()
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(), "digest": digest}))
"""


def run_isa_probe(isa: str) -> dict[str, str]:
    env = {**os.environ, "OFFLOAD_ADAMW_ISA": isa, "PYTHONPATH": str(Path(__file__).parent)}
    if isa == "default":
        env["ATEN_CPU_CAPABILITY"] = "default"  # torch's baseline kernel: no FMA, scalar bf16 rounding
    out = subprocess.run(
        [sys.executable, "-c", ISA_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not X86, reason="the instruction-set variants are x86-64 only")
def test_every_isa_variant_matches_torch_at_its_level():
    # Each variant in its own process (the choice is made once), against torch's kernel of the same
    # level, NaNs in master and wire included; the two FMA variants must agree with each other.
    flags = _cpu_flags()
    digests = {}
    for isa, needed in ISA_FLAGS.items():
        if not needed <= flags or (isa != "default" and not FMA_TORCH):
            continue
        digests[isa] = run_isa_probe(isa)["digest"]
    assert "default" in digests
    if "avx2" in digests and "avx512" in digests:
        assert digests["avx2"] == digests["avx512"]


def test_unknown_isa_override_is_an_error():
    env = {**os.environ, "OFFLOAD_ADAMW_ISA": "sse9"}
    code = (
        "import torch\nfrom offload.engine.cpu_adam import fused_adamw_\nt = torch.zeros(4)\n"
        "fused_adamw_(t, t.clone(), t.clone(), t.clone(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,"
        " weight_decay=0.0, step=1)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "ValueError: OFFLOAD_ADAMW_ISA must be one of avx512, avx2, default; got 'sse9'" in out.stderr


def test_native_core_rejects_bad_step_and_size():
    t = torch.zeros(4)
    ptrs = [t.data_ptr(), t.clone().data_ptr(), t.clone().data_ptr(), t.clone().data_ptr()]
    base = (*ptrs, False, 0)
    with pytest.raises(ValueError, match=r"adamw_step: step must be >= 1; got 0"):
        _C.adamw_step(*base, 4, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 1.0, 1)
    with pytest.raises(ValueError, match=r"adamw_step: n must be >= 0; got -1"):
        _C.adamw_step(*base, -1, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 1.0, 1)
    with pytest.raises(ValueError, match=r"param, exp_avg, exp_avg_sq and grad must be non-null"):
        _C.adamw_step(0, *ptrs[1:], False, 0, 4, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 1.0, 1)


# ---- validation in the facade: every error names the argument and the bad value ----


def good(n: int = 8) -> dict[str, torch.Tensor]:
    return {
        "master": torch.zeros(n),
        "exp_avg": torch.zeros(n),
        "exp_avg_sq": torch.zeros(n),
        "grad": torch.zeros(n, dtype=torch.bfloat16),
        "wire": torch.zeros(n, dtype=torch.bfloat16),
    }


def call(bufs: dict[str, object], **kw: object) -> None:
    args = {**HP, "step": 1, **kw}
    fused_adamw_(bufs["master"], bufs["exp_avg"], bufs["exp_avg_sq"], bufs["grad"], wire=bufs["wire"], **args)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("master", [0.0] * 8, "master must be a torch.Tensor; got list"),
        ("master", torch.zeros(8, dtype=torch.float64), "master must be torch.float32; got torch.float64"),
        (
            "exp_avg",
            torch.zeros(8, dtype=torch.bfloat16),
            "exp_avg must be torch.float32; got torch.bfloat16",
        ),
        ("exp_avg_sq", torch.zeros(8, device="meta"), "exp_avg_sq must be on the CPU; got device meta"),
        (
            "grad",
            torch.zeros(8, dtype=torch.float16),
            "grad must be torch.float32 or torch.bfloat16; got torch.float16",
        ),
        ("wire", torch.zeros(8), "wire must be torch.bfloat16; got torch.float32"),
        ("master", torch.zeros(2, 4), r"master must be 1-D; got shape \(2, 4\)"),
        ("grad", torch.zeros(16, dtype=torch.bfloat16)[::2], r"grad must be contiguous; got stride \(2,\)"),
        ("exp_avg", torch.zeros(9), "exp_avg has 9 elements; master has 8"),
        ("wire", torch.zeros(7, dtype=torch.bfloat16), "wire has 7 elements; master has 8"),
    ],
)
def test_bad_buffer_is_named(name, value, message):
    bufs: dict[str, object] = dict(good())
    bufs[name] = value
    with pytest.raises(ValueError, match=f"^{message}$"):
        call(bufs)


def test_overlapping_buffers_are_rejected():
    bufs = good()
    whole = torch.zeros(16)
    bufs["master"], bufs["exp_avg_sq"] = whole[:8], whole[4:12]
    with pytest.raises(ValueError, match=r"^master and exp_avg_sq overlap in memory"):
        call(bufs)
    bufs = good()
    bufs["wire"] = bufs["grad"]
    with pytest.raises(ValueError, match="overlap in memory"):
        call(bufs)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"step": 0}, r"step must be an int >= 1 \(already incremented\); got 0"),
        ({"step": True}, r"step must be an int >= 1 \(already incremented\); got True"),
        ({"step": 1.0}, r"step must be an int >= 1 \(already incremented\); got 1.0"),
        ({"threads": 0}, "threads must be an int >= 1; got 0"),
    ],
)
def test_bad_scalar_is_named(kw, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        call(good(), **kw)
