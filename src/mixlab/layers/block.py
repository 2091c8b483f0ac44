"""The residual block every model stacks: pre-norm mixer, then an optional pre-norm SwiGLU MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Mixer
from .mlp import SwiGLU
from .norm import RMSNorm, _autocast_dtype


class Block(nn.Module):
    """``x = x + mixer(norm(x))``; then, when ``mlp_hidden > 0``, ``x = x + mlp(mlp_norm(x))``.

    The residual stream ``x [B, T, d_model]`` is kept in float32 (float64 when the model is float64),
    whatever the parameter dtype, as mamba_ssm's ``residual_in_fp32``: a bf16 residual rounds every
    one of the 2·n_layers additions to 8 bits of mantissa, and the accumulated error grows with
    depth, while float32 costs only one [B, T, d_model] tensor per block. Under autocast with
    float32 parameters (the training default) the stream is float32 anyway; this matters for
    bf16/fp16 parameters (inference, pure-bf16 training). Each branch sees its input cast to the
    parameter dtype, or under autocast to the autocast dtype (once: every projection would cast it
    anyway, and each would save its own copy), and its output is added back in the residual dtype.
    The norms then save their float32 input for backward as a bf16 copy (see ``RMSNorm``), so the
    float32 stream costs no activation memory; the MLP's norm takes the mixer's residual add into its pass
    (``RMSNorm.add_forward``).
    """

    def __init__(
        self, d_model: int, mixer: Mixer, mlp_hidden: int = 0, norm_eps: float = 1e-5, device=None, dtype=None
    ) -> None:
        super().__init__()
        if mlp_hidden < 0:
            raise ValueError(f"Block: mlp_hidden={mlp_hidden} must be >= 0 (0 = no MLP)")
        self.norm = RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        if mlp_hidden > 0:
            self.mlp_norm = RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
            self.mlp = SwiGLU(d_model, mlp_hidden, device=device, dtype=dtype)
        else:
            self.mlp_norm = None
            self.mlp = None

    @staticmethod
    def residual_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the residual stream for parameters/activations of ``dtype`` (float32 at least)."""
        return torch.promote_types(dtype, torch.float32)

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """``x [B, T, d_model]`` (residual stream) -> same shape and dtype; ``cache``: the mixer's decode cache."""
        compute_dtype = _autocast_dtype(x) or self.norm.weight.dtype
        h = self.norm(x, out_dtype=compute_dtype)
        h = self.mixer(h) if cache is None else self.mixer(h, cache=cache)
        if self.mlp is None:
            return x + h.to(x.dtype)
        u, x = self.mlp_norm.add_forward(x, h, out_dtype=compute_dtype)  # x + h and its norm, in one pass
        return x + self.mlp(u).to(x.dtype)
