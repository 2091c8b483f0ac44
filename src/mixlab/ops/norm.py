"""RMSNorm and gated RMSNorm, computed in float32 (float64 for float64 inputs) and cast back to the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import resolve_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim. x ``[..., D]``, weight ``[D]``.

    ``backend="auto"`` uses the fused Triton kernel on CUDA, plain PyTorch elsewhere.
    """
    if resolve_backend(backend, x) == "triton":
        from .norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated RMSNorm as in Mamba2 / Gated DeltaNet output norms.

    ``norm_before_gate=False`` (Mamba2 default): ``rmsnorm(x * silu(z))``;
    ``norm_before_gate=True`` (Gated DeltaNet): ``rmsnorm(x) * silu(z)``.
    The RMS is taken over groups of ``group_size`` channels of the last dim (None: the whole dim).
    x, z ``[..., D]``; weight ``[D]``. ``backend="auto"``: fused Triton kernel on CUDA.
    """
    if resolve_backend(backend, x) == "triton":
        from .norm_triton import gated_rms_norm_triton

        return gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate)
    D = x.shape[-1]
    gs = D if group_size is None else group_size
    if D % gs != 0:
        raise ValueError(f"gated_rms_norm: group_size={gs} must divide the last dim {D}")
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(acc))
    xg = xf.reshape(*xf.shape[:-1], D // gs, gs)
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).reshape(xf.shape)
    if weight is not None:
        y = y * weight.to(acc)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
