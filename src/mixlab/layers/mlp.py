"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: the training path computes gate and up with one GEMM against the concatenated weight (False: two GEMMs,
#: the split :class:`_GatedDownSplit`; kept for A/B runs and tests)
FUSED_PROJ = True


def _gated_down_backward(g, u, weight, dout):
    """``dg, du, dw`` of ``down(silu(g) * u)``, recomputing ``silu(g)`` and ``h``."""
    w = weight.to(g.dtype)
    s = F.silu(g)
    # u * s, not s * u: under torch.compile the forward's s * u would be merged with this one (CSE),
    # and the partitioner then saves h (it feeds a matmul here) instead of recomputing it
    h = u * s
    dout = dout.to(g.dtype)
    dw = dout.reshape(-1, dout.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
    acc = torch.promote_types(g.dtype, torch.float32)
    dh = (dout @ w).to(acc)
    gf = g.to(acc)
    sig = torch.sigmoid(gf)
    du = (dh * s.to(acc)).to(u.dtype)
    dg = (dh * u.to(acc) * sig * (1 + gf * (1 - sig))).to(g.dtype)
    return dg, du, dw.to(weight.dtype)


class _GatedDown(torch.autograd.Function):
    """``down(silu(g) * u)`` from ``gu = [g, u]`` ``[..., 2 * hidden]`` (the gate/up GEMM's one output),
    saving only ``gu`` (and the weight): the product ``h`` and ``silu(g)`` are recomputed in backward
    (elementwise, cheap) instead of held, which autograd would do for both (2 of the 4 hidden-wide tensors a
    SwiGLU otherwise keeps per token). One gradient for ``gu``, ``cat([dg, du])``: under torch.compile
    inductor writes both elementwise halves straight into it, and the gate/up backward stays one GEMM.
    Same values as the unfused ops; the matmul runs in ``gu``'s dtype (the autocast dtype)."""

    @staticmethod
    def forward(ctx, gu, weight):  # type: ignore[override]
        g, u = gu.chunk(2, dim=-1)
        with torch.autocast(gu.device.type, enabled=False):
            out = F.linear(F.silu(g) * u, weight.to(gu.dtype))
        ctx.save_for_backward(gu, weight)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        gu, weight = ctx.saved_tensors
        dg, du, dw = _gated_down_backward(*gu.chunk(2, dim=-1), weight, dout)
        return torch.cat([dg, du], dim=-1), dw


class _GatedDownSplit(torch.autograd.Function):
    """:class:`_GatedDown` with ``g`` and ``u`` from separate GEMMs (``FUSED_PROJ = False``)."""

    @staticmethod
    def forward(ctx, g, u, weight):  # type: ignore[override]
        with torch.autocast(g.device.type, enabled=False):
            out = F.linear(F.silu(g) * u, weight.to(g.dtype))
        ctx.save_for_backward(g, u, weight)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        g, u, weight = ctx.saved_tensors
        return _gated_down_backward(g, u, weight, dout)


class SwiGLU(nn.Module):
    """x ``[..., d_model]`` -> ``[..., d_model]`` through a ``hidden``-wide gated layer."""

    residual_out_proj: tuple[str, ...] = ("down_proj",)

    def __init__(self, d_model: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(d_model, hidden, **kw)
        self.up_proj = nn.Linear(d_model, hidden, **kw)
        self.down_proj = nn.Linear(hidden, d_model, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.down_proj.bias is None and self.gate_proj.bias is None:
            if FUSED_PROJ:  # one GEMM (one read of x, one dX in backward); the cat fuses with autocast's cast
                gu = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
                return _GatedDown.apply(gu, self.down_proj.weight)
            return _GatedDownSplit.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(g) * u)
