"""The delta rule's gate kernels (beta, g and their gradients from a packed projection's columns) against torch
autograd of the definition, in float64 under ``TRITON_INTERPRET=1`` (or on the test device's GPU)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gates_match_autograd_of_the_definition(gated, dtype):
    from mixlab.ops.delta_rule.gates_triton import gates_bwd, gates_fwd

    torch.manual_seed(0)
    H, col_b, C = 6, 40, 64  # b at 40..45, a at 46..51, zeros from 52 (130 rows: two row blocks, the second partial)
    col_a, col_zero = col_b + H, col_b + 2 * H
    wide = torch.randn(2, 65, C + 8, dtype=dtype, device=DEVICE) * 4
    wide[0, :3, col_a : col_a + H] = 30.0  # softplus above its threshold (identity)
    proj = wide[..., :C]  # a row stride wider than C
    A_log = torch.randn(H, dtype=dtype, device=DEVICE, requires_grad=True)
    dt_bias = torch.randn(H, dtype=dtype, device=DEVICE, requires_grad=True)
    p = proj.detach().clone().requires_grad_()
    beta_ref = torch.sigmoid(p[..., col_b:col_a])
    g_ref = -A_log.exp() * F.softplus(p[..., col_a:col_zero] + dt_bias)
    beta, g = gates_fwd(proj, col_b, col_a, H, A_log if gated else None, dt_bias if gated else None)
    tol = dict(rtol=2e-6, atol=1e-6)  # the kernels compute in float32 whatever the projection's dtype
    torch.testing.assert_close(beta, beta_ref.float(), **tol)
    assert beta.dtype == torch.float32
    dbeta = torch.randn(2, 65, H, device=DEVICE)
    dg = torch.randn(2, 65, H, device=DEVICE)
    loss = (beta_ref * dbeta).sum()
    if gated:
        torch.testing.assert_close(g, g_ref.float(), **tol)
        loss = loss + (g_ref * dg).sum()
    else:
        assert g is None
    loss.backward()
    dwide = torch.full_like(wide, float("nan"))
    dproj = dwide[..., :C]
    dA, ddt = gates_bwd(proj, col_b, col_a, H, A_log if gated else None, dt_bias if gated else None, dbeta,
                        dg if gated else None, dproj, col_zero if gated else col_a)  # fmt: skip
    assert dproj.dtype == dtype
    torch.testing.assert_close(dproj[..., col_b:col_a], p.grad[..., col_b:col_a], **tol)
    if gated:
        torch.testing.assert_close(dproj[..., col_a:col_zero], p.grad[..., col_a:col_zero], **tol)
        torch.testing.assert_close(dA, A_log.grad, rtol=2e-5, atol=1e-5)  # float32 sums over 130 rows
        torch.testing.assert_close(ddt, dt_bias.grad, rtol=2e-5, atol=1e-5)
        assert dA.dtype == A_log.dtype and ddt.dtype == dt_bias.dtype
    else:
        assert dA is None and ddt is None
    assert (dproj[..., col_zero if gated else col_a :] == 0).all()  # the padding columns are zeroed
    assert dproj[..., :col_b].isnan().all() and dwide[..., C:].isnan().all()  # nothing else is written
