"""Causal depthwise short convolution (the ``d_conv``/``conv_size`` conv of every linear mixer).

``causal_conv1d(x, weight, ...)``: x ``[B, T, C]``, weight ``[C, W]``, bias ``[C]``.
``y[:, t, c] = act(bias[c] + sum_{i<W} weight[c, i] * x[:, t - (W-1) + i, c])`` with the inputs before
the sequence taken from ``initial_state`` ``[B, C, W-1]`` (zeros when None). The final state is
the last ``W-1`` inputs ``[B, C, W-1]`` (the decode cache); a decode step is just a call with T=1.

Backends: the plain-PyTorch path runs anywhere (``reference``/``chunked`` are the same function);
``triton`` (auto on CUDA) handles widths 2-4 and falls back to plain PyTorch otherwise.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .reference import causal_conv1d as causal_conv1d_reference


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv over time; see the module docstring. Returns ``(y [B, T, C], final_state | None)``."""
    if resolve_backend(backend, x) == "triton" and 2 <= weight.shape[-1] <= 4:
        from .triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, initial_state, output_final_state)
    return causal_conv1d_reference(x, weight, bias, activation, initial_state, output_final_state)


__all__ = ["causal_conv1d", "causal_conv1d_reference"]
