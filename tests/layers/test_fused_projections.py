"""Fused input projections: SwiGLU's gate/up and attention's q/k as one GEMM against concatenated weights.

The fused training path must give the outputs and gradients (x and every parameter) of the separate
projections (``mlp.FUSED_PROJ`` / ``attention.FUSED_PROJ`` = False), and the no-grad path is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from mixlab.layers import attention as attention_mod
from mixlab.layers import mlp as mlp_mod
from mixlab.layers.attention import Attention
from mixlab.layers.mlp import SwiGLU


def _run(module, x, fused: bool, monkeypatch, switch):
    monkeypatch.setattr(switch, "FUSED_PROJ", fused)
    module.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    y = module(xx)
    torch.manual_seed(1)
    y.backward(torch.randn_like(y))
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return y.detach(), xx.grad.detach(), grads, y.grad_fn


def _assert_same(a, b):
    (ya, gxa, gpa, _), (yb, gxb, gpb, _) = a, b
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gxa, gxb, rtol=1e-5, atol=1e-6)
    assert gpa.keys() == gpb.keys()
    for name in gpa:
        torch.testing.assert_close(gpa[name], gpb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_swiglu_fused_matches_separate_projections(monkeypatch):
    torch.manual_seed(0)
    m = SwiGLU(32, 48)
    x = torch.randn(2, 5, 32)
    fused = _run(m, x, True, monkeypatch, mlp_mod)
    split = _run(m, x, False, monkeypatch, mlp_mod)
    assert type(fused[3]).__name__ == "_GatedDownBackward"
    assert type(split[3]).__name__ == "_GatedDownSplitBackward"
    _assert_same(fused, split)


def test_swiglu_fused_gradcheck():
    torch.manual_seed(0)
    m = SwiGLU(8, 12, dtype=torch.float64)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    gu = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    w = m.down_proj.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(mlp_mod._GatedDown.apply, (gu, w))


def test_swiglu_no_grad_path_unchanged(monkeypatch):
    torch.manual_seed(0)
    m = SwiGLU(16, 24)
    x = torch.randn(3, 16)

    def boom(*args):
        raise AssertionError("no-grad path must not use the fused autograd function")

    monkeypatch.setattr(mlp_mod._GatedDown, "apply", boom)
    with torch.no_grad():
        y = m(x)
    ref = m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "qkv_bias", "window"),
    [(4, 4, False, None), (4, 2, False, None), (4, 1, True, None), (4, 2, True, 3)],
)
def test_attention_fused_matches_separate_projections(monkeypatch, n_heads, n_kv_heads, qkv_bias, window):
    torch.manual_seed(0)
    m = Attention(32, n_heads=n_heads, n_kv_heads=n_kv_heads, qkv_bias=qkv_bias, window=window)
    if qkv_bias:
        for proj in (m.q_proj, m.k_proj, m.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    x = torch.randn(2, 7, 32)
    calls = []
    orig = Attention._qkv_fused
    monkeypatch.setattr(Attention, "_qkv_fused", lambda self, x: calls.append(1) or orig(self, x))
    fused = _run(m, x, True, monkeypatch, attention_mod)
    assert calls, "the fused path was not taken"
    calls.clear()
    split = _run(m, x, False, monkeypatch, attention_mod)
    assert not calls
    _assert_same(fused, split)


def test_attention_cache_and_no_grad_paths_do_not_fuse(monkeypatch):
    torch.manual_seed(0)
    m = Attention(16, n_heads=2)

    def boom(self, x):
        raise AssertionError("only the training path fuses")

    monkeypatch.setattr(Attention, "_qkv_fused", boom)
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        m(x)
    cache = m.init_cache(1, 8)
    m(x, cache)  # grad enabled, but decoding with a cache
