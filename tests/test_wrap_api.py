"""offload.wrap beyond the Hugging Face families: plain models, errors, meta init, param groups,
LR schedulers and frozen parameters (float32 on the CPU, compared bitwise with fused AdamW)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Qwen2ForCausalLM

import offload
from offload.model import UnsupportedModelError
from tests.models import Stack, batches, tiny


def stack_data(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, generator=g)) for _ in range(n)]


def run(model, opt, data, sched=None) -> list[float]:
    out = []
    for x, y in data:
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        out.append(loss.item())
    return out


def test_plain_module_list_model_matches() -> None:
    ref = Stack()
    ours, opt = offload.wrap(copy.deepcopy(ref), device="cpu", dtype="float32", optimizer={"lr": 1e-2})
    assert run(ours, opt, stack_data()) == run(
        ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, fused=True), stack_data()
    )
    state = offload.state_dict(ours)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k


def test_param_groups_and_lr_scheduler_match() -> None:
    ref = Stack()
    ours, opt = offload.wrap(
        copy.deepcopy(ref),
        device="cpu",
        dtype="float32",
        optimizer={"lr": 1e-2, "weight_decay": 0.1},
        param_groups=[{"params": ["*norm*", "*.bias"], "weight_decay": 0.0}],
    )
    decay = [p for n, p in ref.named_parameters() if "norm" not in n and not n.endswith(".bias")]
    no_decay = [p for n, p in ref.named_parameters() if "norm" in n or n.endswith(".bias")]
    ropt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1, fused=True
    )
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == 0.0

    def lam(step: int) -> float:
        return 1.0 / (1 + step)

    expect = run(ref, ropt, stack_data(), torch.optim.lr_scheduler.LambdaLR(ropt, lam))
    got = run(ours, opt, stack_data(), torch.optim.lr_scheduler.LambdaLR(opt, lam))
    assert got == expect
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"]
    state = offload.state_dict(ours)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("device_blocks", [0, 2])
def test_frozen_parameters_are_not_updated(device_blocks: int) -> None:
    """requires_grad=False: no gradient, no update, no weight decay, left out of the clipping norm,
    as torch does for parameters whose .grad stays None. Whole blocks, single parameters of a
    block and resident parameters alike."""
    ref = tiny("llama", layers=4)
    ref.model.embed_tokens.weight.requires_grad_(False)
    for p in ref.model.layers[0].parameters():
        p.requires_grad_(False)
    ref.model.layers[3].mlp.up_proj.weight.requires_grad_(False)
    ours, opt = offload.wrap(
        copy.deepcopy(ref),
        device="cpu",
        dtype="float32",
        placement={"device_blocks": device_blocks},
        optimizer={"lr": 1e-3, "weight_decay": 0.1, "max_grad_norm": 0.5},
    )
    trainable = [p for p in ref.parameters() if p.requires_grad]
    ropt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.1, fused=True)
    for ids in batches(3):
        ref(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.5)
        ropt.step()
        ropt.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = offload.state_dict(ours)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k
    before = tiny("llama", layers=4).state_dict()
    assert torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )


def test_meta_model_with_random_init_trains_and_keeps_ties() -> None:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(tiny("qwen2").config)
    ours, opt = offload.wrap(model, device="cpu", dtype="float32", init="random")
    inner = ours.module
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    losses = []
    for ids in batches(4):
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    w = offload.state_dict(ours)["model.layers.1.mlp.up_proj.weight"]
    assert 0.015 < float(w.std()) < 0.025  # initializer_range 0.02


def test_meta_model_without_init_is_refused() -> None:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(tiny("qwen2").config)
    with pytest.raises(ValueError, match=r"meta device.*init='random'"):
        offload.wrap(model, device="cpu")


def test_unsupported_model_names_what_was_looked_for() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModelError) as info:
        offload.wrap(model, device="cpu")
    msg = str(info.value)
    assert "ModuleList of at least two identical blocks" in msg and "blocks='path.to.modulelist'" in msg


def test_explicit_block_path() -> None:
    ref = Stack()
    ours, _ = offload.wrap(copy.deepcopy(ref), device="cpu", dtype="float32", blocks="layers")
    assert len(ours.module.layers) == 4
    with pytest.raises(UnsupportedModelError, match=r"no submodule 'nope'"):
        offload.wrap(Stack(), device="cpu", blocks="nope")
    with pytest.raises(UnsupportedModelError, match=r"not a non-empty torch.nn.ModuleList"):
        offload.wrap(Stack(), device="cpu", blocks="head")


def test_mismatched_blocks_are_refused() -> None:
    model = Stack()
    model.layers[2] = nn.Linear(32, 32)
    with pytest.raises(UnsupportedModelError):
        offload.wrap(model, device="cpu", blocks="layers")


def test_bad_param_group_and_config_errors() -> None:
    with pytest.raises(ValueError, match=r"matched no parameters"):
        offload.wrap(Stack(), device="cpu", param_groups=[{"params": "*nothing*", "lr": 1.0}])
    with pytest.raises(ValueError, match=r"unknown options"):
        offload.wrap(Stack(), device="cpu", param_groups=[{"params": "*", "momentum": 0.9}])
    with pytest.raises(ValueError, match=r"optimizer.bogus"):
        offload.wrap(Stack(), device="cpu", optimizer={"bogus": 1})


def test_a_model_over_its_budgets_is_refused_before_anything_moves() -> None:
    """The budgets given are checked by wrap (on a plan made for one token, or the one given),
    naming the tier, the need and what would fit; the model is left as it was."""
    model = tiny("llama", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(offload.plan.PlanError) as info:
        offload.wrap(model, device="cpu", dtype="float32", budgets={"host_bytes": 1 << 20})
    msg = str(info.value)
    assert "host: needs" in msg and "budget 1 MiB" in msg and "offload.budgets" in msg
    assert info.value.plan.problems and not info.value.plan.fits
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    cfg = offload.config.load_config(None, device="cpu", dtype="float32", budgets={"gpu_bytes": 1 << 20})
    plan = offload.plan.make_plan(model, cfg, batch_size=8, seq_len=4096)  # its activations do not fit
    assert not plan.fits
    with pytest.raises(offload.plan.PlanError, match=r"batch 8 x seq 4096\):\n  gpu: needs"):
        offload.wrap(model, cfg, plan=plan)
    fits = offload.plan.make_plan(model, cfg, batch_size=1, seq_len=16)
    ours, _ = offload.wrap(model, cfg, plan=fits)
    ours.runtime.close()


def test_optimizer_state_dict_points_to_offload_save() -> None:
    _, opt = offload.wrap(Stack(), device="cpu")
    with pytest.raises(NotImplementedError, match=r"offload.save"):
        opt.state_dict()


def test_step_without_backward_changes_nothing() -> None:
    ref = Stack()
    ours, opt = offload.wrap(copy.deepcopy(ref), device="cpu", dtype="float32")
    opt.step()
    state = offload.state_dict(ours)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k


def test_overlap_backward_gives_the_same_training() -> None:
    ref = tiny("llama")
    plain, popt = offload.wrap(copy.deepcopy(ref), device="cpu", dtype="float32", optimizer={"lr": 1e-3})
    eager, eopt = offload.wrap(
        copy.deepcopy(ref), device="cpu", dtype="float32", optimizer={"lr": 1e-3, "overlap_backward": True}
    )
    for ids in batches(4):
        for m, o in ((plain, popt), (eager, eopt)):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    a, b = offload.state_dict(plain), offload.state_dict(eager)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_overlap_backward_refuses_accumulation_and_clipping() -> None:
    model, _ = offload.wrap(
        tiny("llama"), device="cpu", dtype="float32", optimizer={"overlap_backward": True}
    )
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match=r"backward\(\) ran again before optimizer.step\(\)"):
        model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"overlap_backward.*max_grad_norm"):
        offload.wrap(tiny("llama"), device="cpu", optimizer={"overlap_backward": True, "max_grad_norm": 1.0})


def test_bf16_one_pass_update_matches_torch_on_upcast_gradients() -> None:
    """bf16 wires update through the fused C++ kernel (bf16 gradient in, bf16 wire out); it must
    give what torch's fused AdamW gives on the same gradients upcast, and a wire equal to the
    master rounded to bf16."""
    ref = Stack()
    model, opt = offload.wrap(copy.deepcopy(ref), device="cpu", dtype="bfloat16", optimizer={"lr": 1e-2})
    x, y = stack_data(1)[0]
    model(x.bfloat16(), y.bfloat16()).backward()
    rt = model.runtime
    rt.executor.finish_backward()
    before = [(r.master.clone(), r.grad.float().clone()) for r in rt.blocks]
    opt.step()
    rt.wait_updates()
    for rec, (master, grad) in zip(rt.blocks, before):
        m, v = torch.zeros_like(master), torch.zeros_like(master)
        torch._fused_adamw_(
            [master],
            [grad],
            [m],
            [v],
            [],
            [torch.ones(())],
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )
        torch.testing.assert_close(rec.master, master, rtol=1e-6, atol=0)
        assert torch.equal(rec.wire, rec.master.to(torch.bfloat16))


@pytest.mark.parametrize("overlap", [False, True])
def test_device_blocks_give_the_same_training(overlap: bool) -> None:
    """Blocks whose state stays on the compute device (here the CPU) follow the same
    mathematics as streamed ones: bitwise equal to fused AdamW in float32."""
    ref = tiny("llama", layers=4)
    ours, opt = offload.wrap(
        copy.deepcopy(ref),
        device="cpu",
        dtype="float32",
        placement={"device_blocks": 2},
        optimizer={"lr": 1e-3, "overlap_backward": overlap},
    )
    assert [r.on_device for r in ours.runtime.blocks] == [True, True, False, False]
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    for ids in batches(4):
        for m, o in ((ref, ropt), (ours, opt)):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    state = offload.state_dict(ours)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k


def test_device_blocks_with_accumulation_and_clipping() -> None:
    ref = tiny("qwen2", layers=4)
    ours, opt = offload.wrap(
        copy.deepcopy(ref),
        device="cpu",
        dtype="float32",
        placement={"device_blocks": 3},
        optimizer={"lr": 1e-3, "max_grad_norm": 0.5},
    )
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    data = batches(6)
    for step in range(3):
        for micro in range(2):
            ids = data[2 * step + micro]
            ref(input_ids=ids, labels=ids).loss.backward()
            ours(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ropt.step()
        ropt.zero_grad()
        opt.step()
        opt.zero_grad()
    state = offload.state_dict(ours)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k
