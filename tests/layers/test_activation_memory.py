"""Activation memory: the bytes a block saves for backward, and the lean autograd functions that cut them.

The 1.3b budgets are the counts of :func:`mixlab.bench.activations.block_saved_bytes` (fake tensors,
the Triton ops' ``setup_context``) after the cuts; the old code saved 96.6 / 156.7 / 86.4 KiB.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mixlab.bench.activations import block_saved_bytes
from mixlab.layers.deltanet import L2_EPS, l2_normalize
from mixlab.layers.mamba2 import Mamba2
from mixlab.layers.mlp import SwiGLU
from mixlab.layers.norm import RMSNorm

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton (run on the CPU under TRITON_INTERPRET=1)",
)
KIB = 1024


@pytest.mark.parametrize(
    ("preset", "budget_kib"),
    [("transformer-1.3b", 56), ("gated_deltanet-1.3b", 92), ("mamba2-1.3b", 60)],
)
def test_1_3b_blocks_save_at_most_their_budget_per_token(preset, budget_kib):
    r = block_saved_bytes(preset, seq_lens=(64, 128))
    assert 0 < r.total <= budget_kib * KIB, r.by_site
    # nothing float32 and token-sized is kept: the residual stream is saved in bf16 by the norms
    big_fp32 = [t for t in r.tensors if t[2] == "float32" and t[3] >= 4 * 2048 * 0.99]
    assert not big_fp32, big_fp32


def test_the_counter_sees_a_linear_input_per_token():
    r = block_saved_bytes("transformer-1.3b", seq_lens=(64, 128), amp=None, triton=False)
    # fp32 without autocast: at least the norm input, q/k/v/o inputs and the MLP's 3 hidden-wide tensors
    assert r.total >= (2 * 2048 + 2048 + 2 * 5632) * 4


def test_lean_rms_norm_matches_the_exact_one_under_autocast():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 64, requires_grad=True)
    dy = torch.randn(3, 7, 64)
    (norm(x) * dy).sum().backward()
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    (y.float() * dy).sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=0.02 * gx.abs().max().item())
    torch.testing.assert_close(norm.weight.grad, gw, rtol=0, atol=0.02 * gw.abs().max().item())


@needs_triton
def test_lean_rms_norm_triton_path_matches_plain(monkeypatch):
    from mixlab.layers import norm as norm_mod

    torch.manual_seed(1)
    norm = RMSNorm(32)
    x = torch.randn(2, 5, 32, requires_grad=True)
    gy = torch.randn(2, 5, 32)  # not y itself: sum(y**2) is ~D per row, its gradient only rounding noise
    outs = []
    for backend in ("chunked", "triton"):
        monkeypatch.setattr(norm_mod, "resolve_backend", lambda b, t, _r=backend: _r)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x, out_dtype=torch.bfloat16)
        (gx,) = torch.autograd.grad((y.float() * gy).sum(), x)
        outs.append((y.float(), gx))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-2)


def test_swiglu_fused_down_projection_gradients():
    torch.manual_seed(0)
    m = SwiGLU(16, 24, dtype=torch.float64)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x, *m.parameters()))
    y = m(x)
    ref = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_swiglu_under_autocast_keeps_values_and_parameter_grad_dtype():
    torch.manual_seed(0)
    m = SwiGLU(16, 24)
    x = torch.randn(2, 3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        ref = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_l2_normalize_gradients_and_values():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (x,))
    xb = torch.randn(2, 5, 4, 64).bfloat16().requires_grad_()
    y = l2_normalize(xb)
    xf = xb.float()
    ref = (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + L2_EPS)).to(xb.dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@needs_triton
def test_mamba2_lean_triton_path_matches_chunked():
    torch.manual_seed(0)
    layer = Mamba2(32, d_state=8, headdim=16, chunk_size=16, backend="chunked")
    x = torch.randn(1, 16, 32, requires_grad=True)
    outs = []
    for backend in ("chunked", "triton"):
        layer.backend = backend
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), (x, layer.D, layer.in_proj.weight))
        outs.append((y, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
