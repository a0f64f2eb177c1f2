"""add_widened: a narrower float gradient added into a float32 sum, bit for bit acc.add_(grad)."""

from __future__ import annotations

import threading

import pytest
import torch

from offload.utils import widen
from offload.utils.widen import add_widened


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 999, 4096, 10_007])
def test_equals_the_mixed_add_bit_for_bit(monkeypatch, dtype, n):
    monkeypatch.setattr(widen, "SLICE", 1000)  # many slices, and a partial last one
    g = torch.Generator().manual_seed(n)
    acc = torch.randn(n, generator=g) * 1e3
    grads = [(torch.randn(n, generator=g) * 10 ** (i - 2)).to(dtype) for i in range(4)]
    want = acc.clone()
    for gr in grads:
        want.add_(gr)
    for gr in grads:
        assert add_widened(acc, gr) is acc
    assert torch.equal(acc, want)


def test_a_buffer_larger_than_the_first_one_gets_a_larger_scratch(monkeypatch):
    monkeypatch.setattr(widen, "SLICE", 1 << 20)
    for n in (10, 5000, 3):  # the scratch grows, then a view of it serves the small one
        acc, gr = torch.zeros(n), torch.ones(n, dtype=torch.bfloat16)
        add_widened(acc, gr)
        assert torch.equal(acc, torch.ones(n))


def test_each_thread_has_its_own_scratch(monkeypatch):
    """The training thread folds while the optimizer's worker adds the last micro-batch."""
    monkeypatch.setattr(widen, "SLICE", 64)
    n, errors = 10_000, []

    def fold(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        acc, want = torch.zeros(n), torch.zeros(n)
        for _ in range(20):
            gr = torch.randn(n, generator=g).bfloat16()
            add_widened(acc, gr)
            want.add_(gr)
        if not torch.equal(acc, want):
            errors.append(seed)

    threads = [threading.Thread(target=fold, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    "acc, grad",
    [
        (torch.zeros(8), torch.ones(8)),  # same dtype: the plain add
        (torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.bfloat16)),  # not float32
        (torch.zeros(4, 4).t(), torch.ones(4, 4, dtype=torch.bfloat16)),  # not contiguous
        (torch.zeros(4, 4), torch.ones(4, dtype=torch.bfloat16)),  # broadcast
    ],
)
def test_other_cases_are_the_plain_add(acc, grad):
    want = acc.clone().add_(grad)
    assert torch.equal(add_widened(acc, grad), want)


def test_a_shape_mismatch_raises_as_the_plain_add_does():
    with pytest.raises(RuntimeError):
        add_widened(torch.zeros(4), torch.ones(5, dtype=torch.bfloat16))


def test_bf16_accumulation_trains_as_with_the_mixed_add(monkeypatch):
    """Through offload.wrap in bfloat16 with 3 micro-batches a step: the folds (on the training
    thread for the second micro-batch, on the fold thread as each later one lands) give the same
    weights as the plain acc.add_(grad) did, and the same as folding everything synchronously."""
    import copy

    import offload
    from offload.engine import executor
    from offload.store import record
    from tests.models import batches, run_steps, tiny

    ref, data = tiny("llama"), batches(6)

    def train() -> dict[str, torch.Tensor]:
        wrapped, opt = offload.wrap(copy.deepcopy(ref), device="cpu", dtype="bfloat16")
        run_steps(wrapped, opt, 2, 3, lambda step, micro: data[step * 3 + micro])
        state = offload.state_dict(wrapped)
        wrapped.runtime.close()
        return state

    widened: list[tuple[str, torch.dtype]] = []
    for mod in (record, executor):
        real = mod.add_widened
        monkeypatch.setattr(
            mod,
            "add_widened",
            lambda acc, grad, real=real, name=mod.__name__: (
                widened.append((name, grad.dtype)),
                real(acc, grad),
            )[1],
        )
    ours = train()
    assert {d for _, d in widened} == {torch.bfloat16}  # the folds took the widening path
    assert {n for n, _ in widened} == {executor.__name__}  # micro-batches 2 and 3, as they landed
    for mod in (record, executor):
        monkeypatch.setattr(mod, "add_widened", lambda acc, grad: acc.add_(grad))
    plain = train()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in ours)
    assert any(
        not torch.equal(ours[k], ref.state_dict()[k].to(ours[k].dtype)) for k in ours if k in ref.state_dict()
    )
    # Without the fold thread (every fold on the training thread, the last one in take_grad).
    monkeypatch.setattr(executor.Executor, "_folder", lambda self: Inline())
    assert all(torch.equal(a, b) for a, b in zip(train().values(), ours.values()))


class Inline:
    """An executor that runs what it is given at once (the folds synchronous)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f: Future = Future()
        f.set_result(fn(*args))
        return f
