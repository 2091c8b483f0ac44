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
    x, z, dy = (torch.randn(37, 24, dtype=torch.float64) for _ in range(3))
    w = torch.rand(24, dtype=torch.float64) + 0.5
    _, rstd = gated_rms_norm_fwd(x, z, w, 1e-5, 8, False)
    dx, dz, dw = gated_rms_norm_bwd(x, z, w, rstd, dy, 8, False)
    buf = torch.full((37, 60), 7.0, dtype=torch.float64)
    dw2 = gated_rms_norm_bwd_into(x, z, w, rstd, dy, 8, False, buf[:, 30:54], buf[:, 2:26])
    assert torch.equal(buf[:, 30:54], dx) and torch.equal(buf[:, 2:26], dz) and torch.equal(dw2, dw)
    rest = torch.cat([buf[:, :2], buf[:, 26:30], buf[:, 54:]], 1)
    assert (rest == 7.0).all()
    with pytest.raises(ValueError, match="unit column stride"):
        gated_rms_norm_bwd_into(x, z, w, rstd, dy, 8, False, buf[:, 30:54], buf[:, 2:50:2])
