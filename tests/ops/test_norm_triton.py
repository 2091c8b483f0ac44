"""Fused Triton (gated) RMSNorm vs the plain ops in mixlab.ops.norm: outputs and every gradient.

CPU under ``TRITON_INTERPRET=1`` (set here before Triton is imported) at tiny shapes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from mixlab.ops.norm import gated_rms_norm, rms_norm
from mixlab.ops.norm_triton import gated_rms_norm_triton, rms_norm_triton

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"


def _rand(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _compare(fn, fn_ref, tensors, atol, rtol):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    y, y_ref = fn(*leaves), fn_ref(*refs)
    assert y.dtype == tensors[0].dtype
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    gy = _rand(torch.Generator().manual_seed(99), *y.shape)
    live = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad((y.double() * gy).sum(), [leaves[i] for i in live])
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [refs[i] for i in live])
    for i, a, r in zip(live, grads, grads_ref):
        assert a.dtype == tensors[i].dtype
        torch.testing.assert_close(a.double(), r, atol=atol * max(1.0, r.abs().max().item()), rtol=rtol, msg=f"arg {i}")


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4, 6])
def test_gated_matches_reference_float64(norm_before_gate, group_size):
    g = torch.Generator().manual_seed(3 if norm_before_gate else 4)
    x, z, w = _rand(g, 3, 7, 12), _rand(g, 3, 7, 12), _rand(g, 12)  # 21 rows: a partial row block

    def fn(x, z, w):
        return gated_rms_norm_triton(x, z, w, 1e-5, group_size, norm_before_gate)

    def ref(x, z, w):
        return gated_rms_norm(x, z, w, 1e-5, group_size, norm_before_gate)

    _compare(fn, ref, [x, z, w], atol=1e-12, rtol=1e-12)


def test_rms_norm_float64_and_no_weight():
    g = torch.Generator().manual_seed(5)
    x, w = _rand(g, 37, 10), _rand(g, 10)
    _compare(lambda x, w: rms_norm_triton(x, w, 1e-6), lambda x, w: rms_norm(x, w, 1e-6), [x, w], 1e-12, 1e-12)
    _compare(lambda x: rms_norm_triton(x, None), lambda x: rms_norm(x, None), [x], 1e-12, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision(dtype, tol):
    g = torch.Generator().manual_seed(6)
    x, z, w = _rand(g, 9, 16, dtype=dtype), _rand(g, 9, 16, dtype=dtype), _rand(g, 16)
    _compare(
        lambda x, z, w: gated_rms_norm_triton(x, z, w, group_size=8),
        lambda x, z, w: gated_rms_norm(x, z, w, group_size=8),
        [x, z, w],
        tol,
        tol,
    )


def test_bad_group_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm_triton(torch.randn(2, 6, device=DEVICE), None, None, group_size=4)


def test_custom_op_traces_under_compile():
    g = torch.Generator().manual_seed(7)
    x, z, w = _rand(g, 4, 8), _rand(g, 4, 8), _rand(g, 8)
    torch.library.opcheck(
        torch.ops.mixlab.gated_rms_norm_fwd.default,
        (x, z, w, 1e-5, 4, False),
        test_utils=("test_schema", "test_faketensor"),
    )

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, z, w):
        return gated_rms_norm_triton(x, z, w, group_size=4) * 3

    xr = x.clone().requires_grad_()
    y = f(xr, z, w)
    torch.testing.assert_close(y, 3 * gated_rms_norm(x, z, w, group_size=4), atol=1e-12, rtol=1e-12)
    y.sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_backward_into_slices_of_a_wider_buffer():
    """``gated_rms_norm_bwd_into`` writes dx / dz into strided slices (Mamba2's in-place zxbcdt gradient) with the
    values of the allocating op, and leaves the rest of the buffer alone."""
    from mixlab.ops.norm_triton import gated_rms_norm_bwd, gated_rms_norm_bwd_into, gated_rms_norm_fwd

    torch.manual_seed(3)
    x, z, dy = (torch.randn(37, 24, dtype=torch.float64, device=DEVICE) for _ in range(3))
    w = torch.rand(24, dtype=torch.float64, device=DEVICE) + 0.5
    _, rstd = gated_rms_norm_fwd(x, z, w, 1e-5, 8, False)
    dx, dz, dw = gated_rms_norm_bwd(x, z, w, rstd, dy, 8, False)
    buf = torch.full((37, 60), 7.0, dtype=torch.float64, device=DEVICE)
    dw2 = gated_rms_norm_bwd_into(x, z, w, rstd, dy, 8, False, buf[:, 30:54], buf[:, 2:26])
    assert torch.equal(buf[:, 30:54], dx) and torch.equal(buf[:, 2:26], dz) and torch.equal(dw2, dw)
    rest = torch.cat([buf[:, :2], buf[:, 26:30], buf[:, 54:]], 1)
    assert (rest == 7.0).all()
    with pytest.raises(ValueError, match="unit column stride"):
        gated_rms_norm_bwd_into(x, z, w, rstd, dy, 8, False, buf[:, 30:54], buf[:, 2:50:2])


@pytest.mark.parametrize(
    ("norm_before_gate", "gated", "group_size"), [(False, True, 8), (True, True, 6), (False, False, 24)]
)
def test_backward_that_recomputes_the_output(norm_before_gate, gated, group_size):
    """Without rstd, ``gated_rms_norm_bwd_into`` recomputes 1/rms from x and z, writes the forward's output, and
    gives the gradients of the backward that reads the forward's rstd (float64, 37 rows: a partial row block)."""
    from mixlab.ops.norm_triton import gated_rms_norm_bwd, gated_rms_norm_bwd_into, gated_rms_norm_fwd

    torch.manual_seed(4)
    x, z, dy = (torch.randn(37, 24, dtype=torch.float64, device=DEVICE) for _ in range(3))
    z = z if gated else None
    w = torch.rand(24, dtype=torch.float64, device=DEVICE) + 0.5
    y_ref, rstd = gated_rms_norm_fwd(x, z, w, 1e-3, group_size, norm_before_gate)
    dx_ref, dz_ref, dw_ref = gated_rms_norm_bwd(x, z, w, rstd, dy, group_size, norm_before_gate)
    dx, y = torch.empty_like(x), torch.full_like(x, 7.0)
    dz = torch.empty_like(x) if gated else x.new_empty(0)
    dw = gated_rms_norm_bwd_into(x, z, w, None, dy, group_size, norm_before_gate, dx, dz, y=y, eps=1e-3)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-13, atol=1e-13)
    if gated:
        torch.testing.assert_close(dz, dz_ref, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="without rstd"):
        gated_rms_norm_bwd_into(x, z, w, None, dy, group_size, norm_before_gate, dx, dz, y=y)


def _lean_reference(x, h, w, eps):
    """``(y, x_new)`` of the residual add and RMSNorm in float64."""
    x_new = x.double() + h.double() if h is not None else x.double()
    y = x_new / torch.sqrt(x_new.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return y, x_new


@pytest.mark.parametrize("with_h", [True, False])
def test_lean_norm_matches_float64_reference(with_h):
    """rms_norm_lean_fwd / _bwd in float64: y, x_new, the saved copy, and dx (norm + residual), dh, dweight."""
    from mixlab.ops.norm_triton import rms_norm_lean_bwd, rms_norm_lean_fwd

    g = torch.Generator().manual_seed(11)
    x, w = _rand(g, 19, 24), _rand(g, 24)  # 19 rows: a partial row block
    h = _rand(g, 19, 24) if with_h else None
    y, x_new, xs, rstd = rms_norm_lean_fwd(x, h, w, 1e-6, torch.float64, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, h, w) if t is not None]
    y_ref, xn_ref = _lean_reference(leaves[0], leaves[1] if with_h else None, leaves[-1], 1e-6)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(xs, xn_ref, atol=0, rtol=0)
    if with_h:
        assert torch.equal(x_new, x + h)
    else:
        assert x_new.numel() == 0
    dy, dres = _rand(g, 19, 24), _rand(g, 19, 24)
    loss = (y_ref * dy).sum() + ((xn_ref * dres).sum() if with_h else 0)
    grads_ref = torch.autograd.grad(loss, leaves)
    dx, dh, dw = rms_norm_lean_bwd(
        xs, w, rstd, dy, dres if with_h else None, torch.float64, torch.float64 if with_h else None
    )
    torch.testing.assert_close(dx, grads_ref[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dw, grads_ref[-1], atol=1e-12, rtol=1e-12)
    if with_h:
        torch.testing.assert_close(dh, grads_ref[1], atol=1e-12, rtol=1e-12)
    else:
        assert dh.numel() == 0


def test_lean_norm_equals_the_unfused_kernels_in_bf16():
    """One pass each way gives the values of the add, the norm kernel and the casts apart (float32 residual,
    bf16 branch, output and saved copy): the sum exactly, the rest to the last bit of its dtype (a reduction
    or a fused multiply-add may round apart)."""
    from mixlab.ops.norm_triton import gated_rms_norm_bwd, gated_rms_norm_fwd, rms_norm_lean_bwd, rms_norm_lean_fwd

    g = torch.Generator().manual_seed(12)
    bf = torch.bfloat16
    x, w = _rand(g, 21, 64, dtype=torch.float32), _rand(g, 64, dtype=torch.float32)
    h, dy = _rand(g, 21, 64, dtype=bf), _rand(g, 21, 64, dtype=bf)
    dres = _rand(g, 21, 64, dtype=torch.float32)
    fp32_ulp = dict(atol=1e-6, rtol=2**-22)
    bf16_ulp = dict(atol=1e-6, rtol=2**-7)  # also the interpreter, which truncates float32 -> bf16 in kernels
    y, x_new, xs, rstd = rms_norm_lean_fwd(x, h, w, 1e-5, bf, bf)
    xn = x + h.float()
    y_ref, rstd_ref = gated_rms_norm_fwd(xn, None, w, 1e-5, 64, False)
    assert torch.equal(x_new, xn)
    torch.testing.assert_close(rstd.view(-1), rstd_ref.view(-1), **fp32_ulp)
    torch.testing.assert_close(y, y_ref.to(bf), **bf16_ulp)
    torch.testing.assert_close(xs, xn.to(bf), **bf16_ulp)
    dx, dh, dw = rms_norm_lean_bwd(xs, w, rstd, dy, dres, torch.float32, bf)
    dx_ref, _, dw_ref = gated_rms_norm_bwd(xs, None, w, rstd, dy, 64, False, torch.float32)
    torch.testing.assert_close(dx, dx_ref + dres, **fp32_ulp)
    torch.testing.assert_close(dw, dw_ref, **fp32_ulp)
    torch.testing.assert_close(dh, (dx_ref + dres).to(bf), **bf16_ulp)


@pytest.mark.parametrize("with_h", [True, False])
def test_lean_norm_module_path_triton_matches_torch(with_h):
    """The autograd function behind ``RMSNorm`` under autocast: the Triton path against the PyTorch one."""
    from mixlab.layers.norm import _LeanRMSNorm

    g = torch.Generator().manual_seed(13)
    bf = torch.bfloat16
    x, w = _rand(g, 2, 9, 32, dtype=torch.float32), _rand(g, 32, dtype=torch.float32)
    h = _rand(g, 2, 9, 32, dtype=bf) if with_h else None
    gy, gx = _rand(g, 2, 9, 32), _rand(g, 2, 9, 32)
    outs, grads = [], []
    for triton in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, h, w) if t is not None]
        out = _LeanRMSNorm.apply(leaves[0], leaves[1] if with_h else None, leaves[-1], 1e-5, bf, bf, triton)
        out = out if with_h else (out,)
        loss = (out[0].double() * gy).sum() + ((out[1].double() * gx).sum() if with_h else 0)
        outs.append(out)
        grads.append(torch.autograd.grad(loss, leaves))
    # bf16 outputs and saved copy: one ulp apart where sums or casts round apart (the interpreter truncates)
    for a, b in zip(outs[0], outs[1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads[0], grads[1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gate_read_in_place_from_a_wider_projection(norm_before_gate):
    """z as a column slice of a wider buffer (Mamba2's zxbcdt): the same y and gradients as a contiguous copy."""
    from mixlab.ops.norm_triton import gated_rms_norm_bwd, gated_rms_norm_fwd

    g = torch.Generator().manual_seed(14)
    x, w, dy = _rand(g, 19, 24), _rand(g, 24), _rand(g, 19, 24)
    wide = _rand(g, 19, 40)
    z = wide[:, 8:32]
    assert z.stride() == (40, 1)
    y, rstd = gated_rms_norm_fwd(x, z, w, 1e-5, 8, norm_before_gate)
    y_ref, rstd_ref = gated_rms_norm_fwd(x, z.contiguous(), w, 1e-5, 8, norm_before_gate)
    assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    for a, b in zip(
        gated_rms_norm_bwd(x, z, w, rstd, dy, 8, norm_before_gate),
        gated_rms_norm_bwd(x, z.contiguous(), w, rstd, dy, 8, norm_before_gate),
    ):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unit column stride"):
        gated_rms_norm_fwd(x, z.t().contiguous().t(), w, 1e-5, 8, False)  # [19, 24] with column stride 19
