"""Fused causal conv -> SiLU -> L2 norm per head (:mod:`mixlab.ops.conv.triton_l2`) vs a float64 PyTorch
reference, and the lean DeltaNet / Gated DeltaNet layer with the fused kernels vs the unfused ones.

CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py) at tiny shapes; T = 37 is odd and not a multiple of
any row block.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from mixlab.ops.conv.reference import causal_conv1d
from mixlab.ops.conv.triton_l2 import conv_silu_l2_bwd, conv_silu_l2_fwd, default_config, supported

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"
EPS = 1e-6


def _reference(x: torch.Tensor, w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``l2(silu(conv(x)))`` per head in float64: ``[B, T, H, K]``."""
    s = causal_conv1d(x.double(), w.double(), None, "silu")[0]
    s = s.view(*x.shape[:2], n_heads, -1)
    return s / torch.sqrt(s.square().sum(-1, keepdim=True) + EPS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _check(W, K, dtype, B=1, H=2, T=37, config=None, wdtype=None):
    g = torch.Generator().manual_seed(W * 1000 + K + B)
    x = torch.randn(B, T, H * K, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    w = (torch.randn(H * K, W, generator=g, dtype=torch.float64) * 0.6).to(DEVICE, wdtype or dtype)
    dy = torch.randn(B, T, H, K, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    y = conv_silu_l2_fwd(x, w, H, EPS, config)
    dx, dw = conv_silu_l2_bwd(x, w, dy, H, EPS, config)
    assert (y.shape, y.dtype, dx.shape, dx.dtype, dw.shape, dw.dtype) == (
        (B, T, H, K),
        dtype,
        x.shape,
        dtype,
        w.shape,
        w.dtype,
    )
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = _reference(xr, wr, H)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    errs = {"y": _rel(y, yr), "dx": _rel(dx, dxr), "dw": _rel(dw, dwr)}
    assert max(errs.values()) <= tol, errs
    return errs


@pytest.mark.parametrize(
    "W,K,dtype",
    [
        (2, 64, torch.float32),
        (3, 256, torch.float32),
        (4, 256, torch.float32),
        (2, 256, torch.bfloat16),
        (3, 64, torch.bfloat16),
        (4, 64, torch.bfloat16),
        (4, 256, torch.bfloat16),
    ],
)
def test_matches_float64_reference(W, K, dtype, bf16_interpreter):
    _check(W, K, dtype)


def test_bf16_input_float32_weight(bf16_interpreter):
    """The layer's case under autocast: bf16 projections, float32 conv weight (dw in float32)."""
    errs = _check(4, 128, torch.bfloat16, wdtype=torch.float32)
    assert errs["dw"] <= 1e-5, errs  # float32 sums of exact products of bf16 inputs


@pytest.mark.parametrize(("W", "B", "config"), [(4, 2, [8, 4, 8, 4, 1]), (3, 1, [16, 2, 4, 2, 1])])
def test_float64_tight_with_many_row_programs(W, B, config):
    """float64 (tight tolerance) with short row blocks: several row programs, a ragged last one, the
    backward's warm-up rows crossing programs, one and two rows a step."""
    _check(W, 64, torch.float64, B=B, config=config)


def test_supported_shapes_and_default_config():
    assert supported(64, 4) and supported(128, 2) and supported(256, 3)
    assert not supported(32, 4) and not supported(96, 4) and not supported(512, 4) and not supported(128, 5)
    bt, _, tl_rows, unroll, _ = default_config(4096, 256)
    assert bt * 256 <= 8192 and tl_rows % unroll == 0
    with pytest.raises(ValueError):
        conv_silu_l2_fwd(torch.zeros(1, 4, 96), torch.zeros(96, 4), 1)


# ------------------------------------------------------------------ the lean layer: fused vs unfused


def _layer(gated: bool):
    from mixlab.layers.deltanet import DeltaNet, GatedDeltaNet

    torch.manual_seed(0)
    kw = dict(n_heads=2, head_dim=64, backend="triton")
    layer = GatedDeltaNet(16, expand_v=0.25, **kw) if gated else DeltaNet(16, expand_v=0.25, **kw)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2 and "conv" not in name:
                p.normal_(0, 0.2)
            elif "conv" in name:
                p.normal_(0, 0.5)
    return layer


def _grads(layer, fused: bool, x, dy, amp):
    import mixlab.ops.conv.triton_l2 as fl
    from mixlab.bench.activations import _force_triton
    from mixlab.layers import deltanet as mod

    old = mod.FUSED_CONV_L2
    mod.FUSED_CONV_L2 = fused
    calls = []
    orig = fl.conv_silu_l2_bwd_into
    fl.conv_silu_l2_bwd_into = lambda *a, **k: calls.append(1) or orig(*a, **k)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    try:
        with _force_triton(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            y = layer(x)
        (y.float() * dy).sum().backward()
    finally:
        mod.FUSED_CONV_L2 = old
        fl.conv_silu_l2_bwd_into = orig
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}, len(calls)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("gated", [True, False])
def test_lean_layer_fused_equals_unfused_fp32(gated):
    layer = _layer(gated)
    assert layer.lean and layer.head_dim == 64
    x, dy = torch.randn(1, 13, 16), torch.randn(1, 13, 16)
    y0, g0, n0 = _grads(layer, False, x, dy, None)
    y1, g1, n1 = _grads(layer, True, x, dy, None)
    assert (n0, n1) == (0, 2)  # the fused backward ran for q and k
    assert _rel_err(y1, y0) <= 1e-5
    assert g1.keys() == g0.keys()
    for name in g0:
        assert _rel_err(g1[name], g0[name]) <= 1e-5, name


def test_lean_layer_fused_bf16_autocast_as_accurate_as_unfused(bf16_interpreter):
    """Under bf16 autocast the fused path skips a bf16 rounding (of the conv output), so the two paths differ
    by bf16 noise (~1e-2 here): both against the float32 unfused run, the fused errors within twice the unfused
    ones plus 1e-2 (a wrong q or k gives errors of order one)."""
    layer = _layer(True)
    x, dy = torch.randn(1, 13, 16), torch.randn(1, 13, 16)
    yr, gr, _ = _grads(layer, False, x, dy, None)
    y0, g0, _ = _grads(layer, False, x, dy, torch.bfloat16)
    y1, g1, n1 = _grads(layer, True, x, dy, torch.bfloat16)
    assert n1 == 2 and y1.dtype == y0.dtype == torch.bfloat16
    for name, a, b, r in [("y", y1, y0, yr)] + [(n, g1[n], g0[n], gr[n]) for n in gr]:
        assert _rel_err(a, r) <= 2 * _rel_err(b, r) + 1e-2, name


def test_strided_input_and_gradient_into_a_slice():
    """x as a channel slice of a wider tensor (the fused q | k | v projection) and dx written into a slice of a
    wider gradient: the same results as on contiguous copies, the rest of the buffer untouched."""
    from mixlab.ops.conv.triton_l2 import conv_silu_l2_bwd_into

    torch.manual_seed(5)
    wide = torch.randn(2, 21, 3 * 64 + 8, dtype=torch.float64)
    x, w = wide[..., 64:128], torch.randn(64, 4, dtype=torch.float64) * 0.5
    dy = torch.randn(2, 21, 1, 64, dtype=torch.float64)
    y_ref = conv_silu_l2_fwd(x.contiguous(), w, 1)
    dx_ref, dw_ref = conv_silu_l2_bwd(x.contiguous(), w, dy, 1)
    assert torch.equal(conv_silu_l2_fwd(x, w, 1), y_ref)
    buf = torch.full_like(wide, 7.0)
    dw = conv_silu_l2_bwd_into(x, w, dy, 1, buf[..., 64:128])
    assert torch.equal(buf[..., 64:128], dx_ref) and torch.equal(dw, dw_ref)
    assert (buf[..., :64] == 7.0).all() and (buf[..., 128:] == 7.0).all()
