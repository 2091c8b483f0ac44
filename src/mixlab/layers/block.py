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

    #: set by :func:`~mixlab.train.parallel.apply_activation_checkpointing`: the block saves only its inputs,
    #: and a pending branch output would be one more of them, so the block before it adds its own
    activation_checkpointing: bool = False

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

    def forward(
        self, x: torch.Tensor, cache: Any = None, branch: torch.Tensor | None = None, defer_add: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, d_model]`` (residual stream) -> same shape and dtype; ``cache``: the mixer's decode cache.

        A stack of blocks can leave each residual add to the next norm, which does it in its own pass
        (``RMSNorm.add_forward``): ``branch`` is the previous block's last branch output, not yet added to x;
        ``defer_add=True`` returns ``(x, branch)`` with this block's last branch output likewise (see
        :meth:`~mixlab.models.LanguageModel.forward_hidden`). The values are those of adding at once.
        """
        compute_dtype = _autocast_dtype(x) or self.norm.weight.dtype
        if branch is None:
            h = self.norm(x, out_dtype=compute_dtype)
        else:
            h, x = self.norm.add_forward(x, branch, out_dtype=compute_dtype)
        h = self.mixer(h) if cache is None else self.mixer(h, cache=cache)
        if self.mlp is not None:
            u, x = self.mlp_norm.add_forward(x, h, out_dtype=compute_dtype)  # x + h and its norm, in one pass
            h = self.mlp(u)
        return (x, h) if defer_add else x + h.to(x.dtype)
