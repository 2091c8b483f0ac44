"""Pieces every recurrent mixer shares: the decode fast-path decision, cached states as op inputs, the
short-conv decode step, and the dt initialisation of Mamba, Mamba2 and Gated DeltaNet."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._backend import resolve_backend

#: Most new tokens that a cached, gradient-free forward runs as a direct recurrence on the cached
#: state instead of the chunked op, per kind of step (see :func:`decode_path`). ``"triton"``: the
#: fused decode kernels walk the tokens one by one with the state in registers, cheaper than the
#: chunk kernels' several launches up to a few dozen tokens (64, as fla's layers switch to their
#: fused-recurrent kernels). ``"plain"``: the PyTorch step costs a few small ops per token, each a
#: full pass over the state, against the chunked ops' fixed cost of dozens of ops; one layer of each
#: tiny preset on one CPU thread (batch 2) breaks even at about 6 tokens (Mamba2: its state is the
#: largest), 8 (Gated DeltaNet), 10 (DeltaNet) and 20 (Mamba): 8 for all, one token being the case
#: that matters (2-3x faster than the chunked ops).
DECODE_STEP_MAX_TOKENS = {"triton": 64, "plain": 8}


def cached_input(state: torch.Tensor | None) -> torch.Tensor | None:
    """A cached state as the initial state of a regular (differentiable) op: a copy when autograd is
    recording, since ops may save their initial state for the backward and the layer then overwrites
    the cache in place; the tensor itself otherwise."""
    return state.clone() if state is not None and torch.is_grad_enabled() else state


def decode_path(layer: nn.Module, x: torch.Tensor, cache: object | None) -> str | None:
    """How a mixer runs ``x [B, T, d]`` against ``cache``: ``"triton"`` (fused decode kernels: the
    backend resolves to Triton and the dtype is not float64), ``"plain"`` (a PyTorch recurrence step),
    or None (the regular chunked/scan op). A direct step needs a cache, 1 to ``DECODE_STEP_MAX_TOKENS``
    new tokens and no gradient (grad mode off, or nothing requiring grad): the kernels are forward-only
    and the steps update the cached state in place."""
    T = x.shape[1]
    if cache is None or T == 0:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return None
    kind = "triton" if resolve_backend(layer.backend, x) == "triton" and x.dtype != torch.float64 else "plain"
    return kind if DECODE_STEP_MAX_TOKENS[kind] >= T else None


def conv_steps(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(causal depthwise conv)`` of a few tokens against a cached window, updating it in place
    (no autograd): x ``[B, T, C]``; state ``[B, C, W-1]``, the previous inputs; weight ``[C, W]`` or
    ``[C, 1, W]``; bias ``[C]``. Returns ``[B, T, C]``. The same sums as
    :func:`mixlab.ops.conv.causal_conv1d`, as a product over a sliding window: for a handful of tokens
    this is a few small ops where ``conv1d`` pays a fixed set-up of hundreds of microseconds."""
    w = weight.reshape(weight.shape[0], -1)
    W = w.shape[1]
    xp = torch.cat([state, x.transpose(1, 2).to(state.dtype)], dim=-1)  # [B, C, W-1+T]
    y = (xp.unfold(-1, W, 1) * w[:, None, :].to(xp.dtype)).sum(-1)  # [B, C, T]
    if bias is not None:
        y = y + bias[:, None].to(y.dtype)
    state.copy_(xp[:, :, xp.shape[-1] - (W - 1) :])
    return F.silu(y).transpose(1, 2).to(x.dtype)


def state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """Dtype of SSM states and of A_log/D: float32, or float64 for a float64 layer."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``y`` with ``softplus(y) = x`` (x > 0), stable for small x: ``x + log(-expm1(-x))``."""
    return x + torch.log(-torch.expm1(-x))


def sample_dt(n: int, dt_min: float, dt_max: float, floor: float, device, dtype) -> torch.Tensor:
    """``n`` time steps log-uniform in ``[dt_min, dt_max]``, floored at ``floor`` (mamba_ssm's init)."""
    u = torch.rand(n, device=device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt.to(dtype)


__all__ = [
    "DECODE_STEP_MAX_TOKENS",
    "cached_input",
    "conv_steps",
    "decode_path",
    "inverse_softplus",
    "sample_dt",
    "state_dtype",
]
