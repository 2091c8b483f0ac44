"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
