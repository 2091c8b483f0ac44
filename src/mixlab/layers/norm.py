"""Normalisation modules over :mod:`mixlab.ops.norm`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops._backend import resolve_backend
from ..ops.norm import gated_rms_norm, rms_norm


class _LeanRMSNorm(torch.autograd.Function):
    """RMSNorm whose backward keeps ``x`` in ``save_dtype`` (bf16 under autocast) plus ``rstd [M, 1]``.

    A float32 residual stream otherwise stays alive as every norm's saved input: 4 extra bytes per
    channel and norm. The forward is the op's (float32 statistics, output ``out_dtype``); only the
    backward reads the rounded ``x``, so gradients differ from the exact ones at bf16 rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype, save_dtype, triton):  # type: ignore[override]
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D)
        with torch.autocast(x.device.type, enabled=False):
            y, rstd = _LeanRMSNorm._fwd(x2, weight, eps, triton)
        ctx.save_for_backward(x2.to(save_dtype), weight, rstd)
        ctx.cfg = (shape, x.dtype, triton)
        return y.to(out_dtype).reshape(shape)

    @staticmethod
    def _fwd(x2, weight, eps, triton):
        """``(y, rstd)`` of ``x2 [M, D]`` in float32 (float64 for float64)."""
        if triton:
            from ..ops.norm_triton import gated_rms_norm_fwd

            y, rstd = gated_rms_norm_fwd(x2.contiguous(), None, weight.contiguous(), float(eps), x2.shape[-1], False)
        else:
            acc = torch.promote_types(x2.dtype, torch.float32)
            xf = x2.to(acc)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            y = xf * rstd * weight.to(acc)
        return y, rstd

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xs, weight, rstd = ctx.saved_tensors
        shape, x_dtype, triton = ctx.cfg
        D = shape[-1]
        acc = rstd.dtype
        dy = dy.reshape(-1, D)
        if triton:
            from ..ops.norm_triton import gated_rms_norm_bwd

            # xs and dy as they are (the kernel widens them): a widened copy of xs in a compiled graph
            # lets the partitioner save that float32 copy (or the block's input) instead of xs
            dx, _, dw = gated_rms_norm_bwd(xs, None, weight.contiguous(), rstd, dy, D, False, x_dtype)
        else:
            xhat = xs.to(acc) * rstd.reshape(-1, 1)
            dyf = dy.to(acc)
            dw = (dyf * xhat).sum(0).to(weight.dtype)
            g = dyf * weight.to(acc)
            dx = (rstd.reshape(-1, 1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x_dtype)
        return dx.reshape(shape), dw, None, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype of ``x``'s device when autocast is on there, else None."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class RMSNorm(nn.Module):
    """RMSNorm over the last dim ``[..., D]`` (float32 statistics).

    ``forward(x, out_dtype)``: the output in ``out_dtype`` (default: x's dtype). Under autocast a
    float32 ``x`` is saved for backward in the autocast dtype (see :class:`_LeanRMSNorm`).
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        amp = _autocast_dtype(x)
        lean = (
            amp is not None
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and x.dtype == torch.float32
            and amp.itemsize < x.dtype.itemsize
        )
        if not lean:
            y = rms_norm(x, self.weight, self.eps)
            return y if out_dtype is None else y.to(out_dtype)
        triton = resolve_backend("auto", x) == "triton" and _fused_width_ok(x.shape[-1])
        return _LeanRMSNorm.apply(x, self.weight, self.eps, out_dtype or x.dtype, amp, triton)


def _fused_width_ok(d: int) -> bool:
    """Widths the fused norm kernel takes (as :func:`~mixlab.ops.norm_triton.gated_rms_norm_triton`)."""
    return 0 < d <= 65536


class GatedRMSNorm(nn.Module):
    """Gated RMSNorm ``[..., D]``: ``norm(x * silu(z))`` (Mamba2) or ``norm(x) * silu(z)``
    (``norm_before_gate=True``, Gated DeltaNet), with RMS statistics over groups of ``group_size``."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
