"""AdamW parameter groups and the learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from mixlab.config import ModelConfig, TrainConfig
from mixlab.models import build_model
from mixlab.train.optim import LRSchedule, build_optimizer, param_groups


def test_no_weight_decay_on_vectors_and_flagged_params() -> None:
    model = build_model(ModelConfig(name="t", vocab_size=64, d_model=16, n_layers=2, pattern="A", d_intermediate=32))
    flagged = nn.Parameter(torch.zeros(3, 3))
    flagged._no_weight_decay = True
    model.register_parameter("flagged", flagged)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = dict(model.named_parameters())
    for n in no_decay["names"]:
        assert names[n].ndim < 2 or getattr(names[n], "_no_weight_decay", False), n
    assert "flagged" in no_decay["names"] and any("norm" in n for n in no_decay["names"])
    assert "embed.weight" in decay["names"] and "lm_head.weight" not in decay["names"]  # tied: once
    n_all = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_all


def test_gated_deltanet_special_params_get_no_decay() -> None:
    model = build_model(ModelConfig(name="g", vocab_size=64, d_model=32, n_layers=1, pattern="G", d_intermediate=0))
    _, no_decay = param_groups(model, 0.1)
    assert any("A_log" in n for n in no_decay["names"]) and any("dt_bias" in n for n in no_decay["names"])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules(kind: str) -> None:
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule=kind)
    s = LRSchedule(cfg)
    assert [s(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])  # linear warmup
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    if kind == "constant":
        assert s(60) == s(110) == 1.0
    elif kind == "linear":
        assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    else:
        assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
        assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(values))  # never rises after warmup


def test_optimizer_uses_the_schedule() -> None:
    model = nn.Linear(4, 4)
    cfg = TrainConfig(lr=0.5, warmup_steps=2, max_steps=10)
    opt = build_optimizer(model, cfg)
    assert LRSchedule(cfg).apply(opt, 0) == 0.25
    assert all(g["lr"] == 0.25 for g in opt.param_groups)
    assert opt.param_groups[0]["betas"] == cfg.betas


@pytest.mark.parametrize("max_norm", [0.5, float("inf")])
def test_clip_folded_into_a_fused_optimizer_matches_clipping_the_gradients(max_norm) -> None:
    from mixlab.train.parallel import clip_grad_norm

    torch.manual_seed(0)
    ref = [torch.randn(40, 30, requires_grad=True), torch.randn(30, requires_grad=True)]
    mine = [p.detach().clone().requires_grad_() for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=True)
    opt = torch.optim.AdamW(mine, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(5):
        for p, q in zip(ref, mine):
            g = torch.randn_like(p) * (3.0 if step % 2 else 0.01)  # the clip is active on odd steps only
            p.grad, q.grad = g.clone(), g.clone()
        before = mine[0].grad.clone()
        norm_ref = clip_grad_norm(ref, max_norm, opt_ref)
        norm = clip_grad_norm(mine, max_norm, opt)
        assert norm == pytest.approx(norm_ref, rel=1e-6)
        if step % 2 and max_norm < 1:
            assert opt.grad_scale.item() > 1.0
            assert torch.equal(mine[0].grad, before)  # gradients left as they were
            assert not torch.allclose(mine[0].grad, ref[0].grad)  # while the reference rescaled its own
        opt_ref.step()
        opt.step()
        for p, q in zip(ref, mine):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("max_norm", [0.5, float("inf")])
def test_fused_step_prepared_without_a_read_back(max_norm) -> None:
    """``clip_for_fused_step``: the same updates as clipping on the host; a step whose gradient norm or loss is not
    finite leaves the parameters and the optimizer state (moments, step count) as they were."""
    from mixlab.train.parallel import clip_for_fused_step, clip_grad_norm

    torch.manual_seed(1)
    ref = [torch.randn(40, 30, requires_grad=True), torch.randn(30, requires_grad=True)]
    mine = [p.detach().clone().requires_grad_() for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    opt = torch.optim.AdamW(mine, lr=1e-2, weight_decay=0.1, fused=True)
    assert clip_for_fused_step(mine, 1.0, torch.optim.AdamW(mine, foreach=True), torch.ones(())) is None
    for step in range(6):
        bad = {2: "norm", 4: "loss"}.get(step)
        for p, q in zip(ref, mine):
            g = torch.randn_like(p) * (3.0 if step % 2 else 0.01)
            p.grad, q.grad = g.clone(), g.clone()
        if bad == "norm":
            mine[1].grad[3] = float("inf")
        loss = torch.tensor(float("nan") if bad == "loss" else 1.0)
        before = [q.detach().clone() for q in mine]
        state = [{k: v.clone() for k, v in opt.state[q].items()} for q in mine if q in opt.state]
        norm = clip_for_fused_step(mine, max_norm, opt, loss)
        opt.step()
        if bad:
            assert not (torch.isfinite(norm) and torch.isfinite(loss))
            assert all(torch.equal(q, b) for q, b in zip(mine, before))
            after = [{k: v for k, v in opt.state[q].items()} for q in mine if q in opt.state]
            assert len(after) == len(state) and all(torch.equal(a[k], s_[k]) for a, s_ in zip(after, state) for k in s_)
            continue
        assert norm.item() == pytest.approx(clip_grad_norm(ref, max_norm, opt_ref), rel=1e-6)
        opt_ref.step()
        for p, q in zip(ref, mine):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    assert opt.state[mine[0]]["step"].item() == opt_ref.state[ref[0]]["step"].item() == 4
