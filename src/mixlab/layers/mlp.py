"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GatedDown(torch.autograd.Function):
    """``down(silu(g) * u)`` saving only ``g`` and ``u`` (and the weight): the product ``h`` and
    ``silu(g)`` are recomputed in backward (elementwise, cheap) instead of held, which autograd
    would do for both (2 of the 4 hidden-wide tensors a SwiGLU otherwise keeps per token).
    Same values as the unfused ops; the matmul runs in ``g``'s dtype (the autocast dtype)."""

    @staticmethod
    def forward(ctx, g, u, weight):  # type: ignore[override]
        with torch.autocast(g.device.type, enabled=False):
            out = F.linear(F.silu(g) * u, weight.to(g.dtype))
        ctx.save_for_backward(g, u, weight)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        g, u, weight = ctx.saved_tensors
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
        g, u = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and self.down_proj.bias is None:
            return _GatedDown.apply(g, u, self.down_proj.weight)
        return self.down_proj(F.silu(g) * u)
