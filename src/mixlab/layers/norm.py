"""Normalisation modules over :mod:`mixlab.ops.norm`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim ``[..., D]`` (float32 statistics)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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
