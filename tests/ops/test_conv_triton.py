"""Triton causal depthwise conv vs the plain-PyTorch reference: outputs, final state, every gradient.

CPU under ``TRITON_INTERPRET=1`` (set here before Triton is imported) at tiny shapes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from mixlab.ops.conv.reference import causal_conv1d
from mixlab.ops.conv.triton import causal_conv1d_triton, causal_conv1d_update_triton

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"


def _rand(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize(
    "T,W,activation,has_bias,has_state",
    [
        (11, 4, "silu", True, True),  # the first taps read the initial state
        (40, 4, "silu", True, False),  # two row tiles of 32
        (2, 4, None, False, True),  # T < W-1: the final state still holds part of the initial state
        (7, 2, "swish", True, False),
        (5, 3, None, True, True),
    ],
)
def test_matches_reference_float64(T, W, activation, has_bias, has_state):
    g = torch.Generator().manual_seed(T * 10 + W)
    B, C = 2, 5
    x = _rand(g, B, T, C).requires_grad_()
    w = _rand(g, C, W).requires_grad_()
    b = _rand(g, C).requires_grad_() if has_bias else None
    h0 = _rand(g, B, C, W - 1).requires_grad_() if has_state else None
    y, fin = causal_conv1d_triton(x, w, b, activation, h0, output_final_state=True)
    y_ref, fin_ref = causal_conv1d(x, w, b, activation, h0, output_final_state=True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fin, fin_ref, atol=0, rtol=0)
    gy, gf = _rand(g, *y.shape), _rand(g, *fin.shape)
    leaves = [t for t in (x, w, b, h0) if t is not None]
    grads = torch.autograd.grad((y * gy).sum() + (fin * gf).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (fin_ref * gf).sum(), leaves)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "T,W,has_state,fwd",
    [
        (21, 4, True, [8, 4, 1]),  # several row programs (a partial last one), 4 rows a step, ragged channel tiles
        (21, 3, True, [6, 8, 2]),  # 2 rows a step; the first rows of each program read the one before's rows
        (9, 4, False, [1, 2, 1]),  # one row a program: every tap comes from the ring's warm-up loads
        (5, 2, True, [3, 16, 1]),  # odd rows: one row a step
    ],
)
def test_forward_row_and_channel_tiles(T, W, has_state, fwd):
    """The forward walks ``fwd[0]`` rows per program over channel tiles of ``fwd[1]``: equal to the float64
    reference, initial state included."""
    g = torch.Generator().manual_seed(T * 7 + W)
    B, C = 2, 5
    x, w, b = _rand(g, B, T, C), _rand(g, C, W), _rand(g, C)
    h0 = _rand(g, B, C, W - 1) if has_state else None
    y, _ = causal_conv1d_triton(x, w, b, "silu", h0, config=[*fwd, 8, 8, 1, 4])
    torch.testing.assert_close(y, causal_conv1d(x, w, b, "silu", h0)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "T,W,has_state,bwd",
    [
        (21, 4, True, [8, 4, 1, 4]),  # several row programs, 4 rows a step: the warm-up rows cross programs
        (21, 4, False, [8, 8, 2, 2]),  # channel tiles of 4 over C = 5 (a ragged last tile)
        (13, 3, True, [4, 8, 1, 1]),
        (9, 2, False, [4, 4, 1, 2]),
        (2, 4, True, [4, 8, 1, 4]),  # T < W-1: the final state's gradient lands in the initial state's
    ],
)
def test_backward_row_and_channel_tiles(T, W, has_state, bwd):
    # bwd = [rows per program, channels per program, warps, rows per step]
    g = torch.Generator().manual_seed(T + W)
    B, C = 2, 5
    x, w, b = _rand(g, B, T, C).requires_grad_(), _rand(g, C, W).requires_grad_(), _rand(g, C).requires_grad_()
    h0 = _rand(g, B, C, W - 1).requires_grad_() if has_state else None
    y, fin = causal_conv1d_triton(x, w, b, "silu", h0, output_final_state=True, config=[32, 8, 1, *bwd])
    y_ref, fin_ref = causal_conv1d(x, w, b, "silu", h0, output_final_state=True)
    gy, gf = _rand(g, *y.shape), _rand(g, *fin.shape)
    leaves = [t for t in (x, w, b, h0) if t is not None]
    grads = torch.autograd.grad((y * gy).sum() + (fin * gf).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (fin_ref * gf).sum(), leaves)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bwd", [[8, 8, 1, 3], [8, 8, 1, 8]])
def test_bad_backward_unroll_is_rejected(bwd):
    # 3 does not divide 8 rows; 8 rows in flight exceed the 4 the kernel names (it would reuse the 4th)
    g = torch.Generator().manual_seed(3)
    x = _rand(g, 1, 9, 5).requires_grad_()
    y, _ = causal_conv1d_triton(x, _rand(g, 5, 4), None, "silu", None, config=[32, 8, 1, *bwd])
    with pytest.raises(ValueError, match="bwd_unroll"):
        y.sum().backward()


def test_strided_input_and_bf16():
    # x is a channel slice of a wider projection (as in Mamba's in_proj output), in bfloat16
    g = torch.Generator().manual_seed(7)
    B, T, C, W = 2, 9, 6, 4
    xz = _rand(g, B, T, 2 * C, dtype=torch.bfloat16)
    x = xz[..., :C].detach().requires_grad_()
    x_view = xz.detach().clone().requires_grad_()
    w, b = _rand(g, C, W), _rand(g, C)
    y, _ = causal_conv1d_triton(x_view[..., :C], w, b, "silu")
    y_ref, _ = causal_conv1d(x.double(), w, b, "silu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, atol=2e-2, rtol=2e-2)
    gy = _rand(g, B, T, C, dtype=torch.bfloat16)
    (y * gy).sum().backward()
    (dx_ref,) = torch.autograd.grad((y_ref * gy.double()).sum(), x)
    torch.testing.assert_close(x_view.grad[..., :C].double(), dx_ref.double(), atol=3e-2, rtol=3e-2)
    assert (x_view.grad[..., C:] == 0).all()


@pytest.mark.parametrize("W", [2, 4])
def test_decode_update_continues_the_sequence(W):
    g = torch.Generator().manual_seed(W)
    B, T, C = 2, 4, 6
    x, w, b, h0 = _rand(g, B, T, C), _rand(g, C, W), _rand(g, C), _rand(g, B, C, W - 1)
    y_ref, fin_ref = causal_conv1d(x, w, b, "silu", h0, output_final_state=True)
    state = h0.clone()
    ys = [causal_conv1d_update_triton(x[:, t], state, w, b, "silu") for t in range(T)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, fin_ref, atol=0, rtol=0)


def test_bad_width_is_rejected():
    with pytest.raises(ValueError, match="width"):
        causal_conv1d_triton(torch.randn(1, 3, 2, device=DEVICE), torch.randn(2, 6, device=DEVICE))


def test_custom_op_traces_under_compile():
    g = torch.Generator().manual_seed(11)
    x, w = _rand(g, 1, 5, 3), _rand(g, 3, 4)
    torch.library.opcheck(
        torch.ops.mixlab.causal_conv1d_fwd.default,
        (x, w, None, None, True, [32, 4, 4, 32, 4, 4]),
        test_utils=("test_schema", "test_faketensor"),
    )

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, w):
        return causal_conv1d_triton(x, w, activation="silu")[0] + 1

    xr = x.clone().requires_grad_()
    y = f(xr, w)
    torch.testing.assert_close(y, causal_conv1d(x, w, activation="silu")[0] + 1, atol=1e-12, rtol=1e-12)
    y.sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_backward_into_channel_slices():
    """``causal_conv1d_bwd_into`` over channel ranges of a wider buffer (Mamba2's x / B / C pieces) gives the
    allocating op's dx, dweight and dbias, and leaves the rest of the buffer alone."""
    from mixlab.ops.conv.triton import causal_conv1d_bwd, causal_conv1d_bwd_into, default_config

    torch.manual_seed(4)
    x = torch.randn(2, 45, 40, dtype=torch.float64, device=DEVICE)[..., 4:36]  # strided input: 32 of 40 channels
    w = torch.randn(32, 4, dtype=torch.float64, device=DEVICE)
    b = torch.randn(32, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(2, 45, 32, dtype=torch.float64, device=DEVICE)
    cfg = default_config(45, 32)
    dx, dw, db, _ = causal_conv1d_bwd(x, w, b, None, dy, None, True, cfg)
    buf = torch.full((2, 45, 50), 7.0, dtype=torch.float64, device=DEVICE)
    for lo, hi in ((0, 20), (20, 32)):
        dw2, db2, _ = causal_conv1d_bwd_into(
            x[..., lo:hi], w[lo:hi], b[lo:hi], None, dy[..., lo:hi], None, True, cfg, buf[..., 10 + lo : 10 + hi]
        )
        torch.testing.assert_close(dw2, dw[lo:hi], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db2, db[lo:hi], rtol=1e-12, atol=1e-12)
    assert torch.equal(buf[..., 10:42], dx)
    assert (buf[..., :10] == 7.0).all() and (buf[..., 42:] == 7.0).all()


def test_unused_final_state_gets_no_zero_filled_gradient(monkeypatch):
    from mixlab.ops.conv import triton as conv_triton

    seen = []
    real = conv_triton.causal_conv1d_bwd

    def spy(*args):
        seen.append(args[5])  # dfinal
        return real(*args)

    monkeypatch.setattr(conv_triton, "causal_conv1d_bwd", spy)
    x = torch.randn(1, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y, _ = causal_conv1d_triton(x, w, activation="silu")
    y.sum().backward()
    assert seen == [None] and x.grad is not None


@pytest.mark.parametrize(
    "T,P,bwd,bias,D_per_p,unroll",
    [
        (21, 4, [8, 8, 1, 4], True, False, 2),  # 3 row programs (the warm-up rows cross them), 2 heads a channel tile
        (21, 4, [4, 16, 1, 2], False, True, 4),  # 4 heads a tile over 3 heads (a ragged tile), D per channel
        (6, 8, [8, 8, 1, 1], True, False, 1),  # T < rows: one program, one head a tile
    ],
)
def test_backward_with_ssd_values_folded_in(T, P, bwd, bias, D_per_p, unroll, monkeypatch):
    """``causal_conv1d_bwd_values_into`` (Mamba2's x channels feeding SSD's values ``xc·d`` and skip ``D·xc``):
    dx, dweight, dbias of the conv at the gradient ``dv·d + D·dO``, and ``Σ_p dv·xc`` and dD, against autograd
    through the reference conv in float64."""
    from mixlab.ops.conv import triton as conv_triton
    from mixlab.ops.conv.triton import causal_conv1d_bwd_values_into

    monkeypatch.setattr(conv_triton, "VALUES_BWD_UNROLL", unroll)  # rows in flight per step
    g = torch.Generator().manual_seed(T + P)
    B, H, W = 2, 3, 4
    C = H * P
    x = _rand(g, B, T, C + 5)[..., 2 : 2 + C].requires_grad_()  # a channel slice, as of Mamba2's xBC
    w = _rand(g, C, W).requires_grad_()
    b = _rand(g, C).requires_grad_() if bias else None
    dv, do = _rand(g, B, T, H, P), _rand(g, B, T, H, P)
    d = (_rand(g, B, T, H).abs() + 0.1).float()  # the kernel reads d in float32
    D = _rand(g, H, P) if D_per_p else _rand(g, H)
    xc = causal_conv1d(x, w, b, "silu")[0].view(B, T, H, P)
    Dx = D if D_per_p else D[:, None]
    gv = dv * d.double()[..., None] + Dx * do
    leaves = [t for t in (x, w, b) if t is not None]
    refs = torch.autograd.grad((xc * gv).sum(), leaves)
    ddx_ref = (dv * xc).sum(-1).detach()
    dD_ref = (do * xc).sum((0, 1)).detach()
    dD_ref = dD_ref if D_per_p else dD_ref.sum(-1)
    buf = torch.full((B, T, C + 3), 7.0, dtype=torch.float64, device=DEVICE)
    cfg = [32, 8, 1, *bwd]
    dw, db, ddx, dD = causal_conv1d_bwd_values_into(
        x.detach(), w.detach(), b.detach() if bias else None, dv, do, d, D, cfg, buf[..., 1:-2]
    )
    torch.testing.assert_close(buf[..., 1:-2], refs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dw, refs[1], atol=1e-6, rtol=1e-6)
    if bias:
        torch.testing.assert_close(db, refs[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ddx.double(), ddx_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dD, dD_ref, atol=1e-6, rtol=1e-6)
    assert (buf[..., :1] == 7.0).all() and (buf[..., -2:] == 7.0).all()
