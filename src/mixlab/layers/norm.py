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

    With ``h`` (a branch output) the residual add comes first: ``x_new = x + h`` (x's dtype) is normalised
    and returned as well, ``(y, x_new)``; its backward adds x_new's gradient to the norm's, so the add costs
    no pass of its own. The Triton path does each direction in one kernel (:func:`rms_norm_lean_fwd`).
    """

    @staticmethod
    def forward(ctx, x, h, weight, eps, out_dtype, save_dtype, triton):  # type: ignore[override]
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D)
        h2 = h.reshape(-1, D) if h is not None else None
        with torch.autocast(x.device.type, enabled=False):
            if triton:
                from ..ops.norm_triton import rms_norm_lean_fwd

                y, x_new, xs, rstd = rms_norm_lean_fwd(
                    x2.contiguous(), h2.contiguous() if h2 is not None else None, weight.contiguous(), float(eps),
                    out_dtype, save_dtype,
                )  # fmt: skip
            else:
                x_new = x2 + h2.to(x2.dtype) if h2 is not None else x2
                acc = torch.promote_types(x2.dtype, torch.float32)
                xf = x_new.to(acc)
                rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
                y = (xf * rstd * weight.to(acc)).to(out_dtype)
                xs = x_new.to(save_dtype)
        ctx.save_for_backward(xs, weight, rstd)
        ctx.cfg = (shape, x.dtype, h.dtype if h is not None else None, triton)
        if h is None:
            return y.reshape(shape)
        return y.reshape(shape), x_new.reshape(shape)

    @staticmethod
    def backward(ctx, dy, dres=None):  # type: ignore[override]
        xs, weight, rstd = ctx.saved_tensors
        shape, x_dtype, h_dtype, triton = ctx.cfg
        D = shape[-1]
        dres = dres.reshape(-1, D) if dres is not None else None  # the gradient of x_new (with h)
        dy = dy.reshape(-1, D)
        if triton:
            from ..ops.norm_triton import rms_norm_lean_bwd

            # xs and dy as they are (the kernel widens them): a widened copy of xs in a compiled graph
            # lets the partitioner save that float32 copy (or the block's input) instead of xs
            dx, dh, dw = rms_norm_lean_bwd(xs, weight.contiguous(), rstd, dy, dres, x_dtype, h_dtype)
        else:
            acc = rstd.dtype
            xhat = xs.to(acc) * rstd.reshape(-1, 1)
            dyf = dy.to(acc)
            dw = (dyf * xhat).sum(0).to(weight.dtype)
            g = dyf * weight.to(acc)
            dx = rstd.reshape(-1, 1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            if dres is not None:
                dx = dx + dres.to(acc)
            dx = dx.to(x_dtype)
            dh = dx.to(h_dtype) if h_dtype is not None else None
        dh = dh.reshape(shape) if h_dtype is not None else None
        return dx.reshape(shape), dh, dw, None, None, None, None


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
        amp = self._lean_dtype(x)
        if amp is None:
            y = rms_norm(x, self.weight, self.eps)
            return y if out_dtype is None else y.to(out_dtype)
        return _LeanRMSNorm.apply(x, None, self.weight, self.eps, out_dtype or x.dtype, amp, self._triton(x))

    def add_forward(
        self, x: torch.Tensor, h: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add, then the norm: ``(norm(x_new), x_new)`` with ``x_new = x + h.to(x.dtype)``.

        x ``[..., D]`` (the residual stream), h a branch output of its shape. Under autocast both directions
        run as one pass each (see :class:`_LeanRMSNorm`); the values are those of the add and the norm apart.
        """
        if h.shape != x.shape:
            raise ValueError(f"RMSNorm.add_forward: h must have x's shape {list(x.shape)}, got {list(h.shape)}")
        amp = self._lean_dtype(x, h)
        if amp is None:
            x = x + h.to(x.dtype)
            return self(x, out_dtype), x
        return _LeanRMSNorm.apply(x, h, self.weight, self.eps, out_dtype or x.dtype, amp, self._triton(x))

    def _lean_dtype(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.dtype | None:
        """The dtype to save x in for backward when the lean path applies (autocast, grad, float32 x), else None."""
        amp = _autocast_dtype(x)
        grad = x.requires_grad or self.weight.requires_grad or (h is not None and h.requires_grad)
        if amp is None or not torch.is_grad_enabled() or not grad:
            return None
        return amp if x.dtype == torch.float32 and amp.itemsize < x.dtype.itemsize else None

    @staticmethod
    def _triton(x: torch.Tensor) -> bool:
        return resolve_backend("auto", x) == "triton" and _fused_width_ok(x.shape[-1])


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
