"""Plain-PyTorch causal depthwise convolution with decode state (runs anywhere, differentiable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv over time.

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, W]`` (a ``nn.Conv1d`` weight ``[C, 1, W]`` is accepted too).
        bias: ``[C]`` or None.
        activation: None or ``"silu"``/``"swish"``.
        initial_state: ``[B, C, W-1]``, the W-1 inputs preceding ``x`` (oldest first), or None.
        output_final_state: also return the last W-1 inputs ``[B, C, W-1]``.

    Returns:
        ``(y [B, T, C], final_state | None)``.
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, C], got shape {tuple(x.shape)}")
    B, _, C = x.shape
    if weight.shape[0] != C:
        raise ValueError(f"causal_conv1d: weight has {weight.shape[0]} channels but x has {C}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation={activation!r}, allowed: {ACTIVATIONS}")
    W = weight.shape[1]
    xt = x.transpose(1, 2)  # [B, C, T]
    if initial_state is None:
        prev = xt.new_zeros(B, C, W - 1)
    else:
        if initial_state.shape != (B, C, W - 1):
            raise ValueError(
                f"causal_conv1d: initial_state must be [B, C, W-1]={[B, C, W - 1]}, got {list(initial_state.shape)}"
            )
        prev = initial_state.to(xt.dtype)
    xp = torch.cat([prev, xt], dim=2)  # [B, C, T + W - 1]
    y = F.conv1d(xp, weight.unsqueeze(1).to(xt.dtype), bias.to(xt.dtype) if bias is not None else None, groups=C)
    if activation is not None:
        y = F.silu(y)
    final = xp[:, :, xp.shape[2] - (W - 1) :].contiguous() if output_final_state else None
    return y.transpose(1, 2), final
