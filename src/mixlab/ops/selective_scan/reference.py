"""Mamba's selective scan as a step-by-step recurrence: the definition the other backends are tested against.

Semantics of mamba_ssm's ``selective_scan_ref`` (plus an initial state). Per batch b, channel d and
state n, after ``delta = softplus(delta + delta_bias)`` (each step optional):

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t = y_t * silu(z_t)

B and C are ``[B, N, L]`` (shared by every channel) or ``[B, G, N, L]``, where group g serves the
``D/G`` contiguous channels ``g*D/G .. (g+1)*D/G - 1``. Slow (a Python loop over time) but
obviously right, differentiable by autograd, float64-friendly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (the scan always runs in at least float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: torch.Tensor, d: int) -> torch.Tensor:
    """B or C ``[B, N, L]`` / ``[B, G, N, L]`` -> ``[B, 1 or D, N, L]`` (group g serves D/G contiguous channels)."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.repeat_interleave(d // t.shape[1], dim=1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan, one time step at a time.

    Args:
        u, delta: ``[B, D, L]``; A: ``[D, N]``; B, C: ``[B, N, L]`` or ``[B, G, N, L]`` (D % G == 0).
        D: ``[D]`` skip; z: ``[B, D, L]`` gate; delta_bias: ``[D]``.
        initial_state: ``[B, D, N]`` state before the first step (zeros when None).
        return_last_state: also return the state after the last step.

    Returns:
        ``y [B, D, L]`` in u's dtype, or ``(y, last_state [B, D, N])`` with the state in float32
        (float64 for float64 inputs).
    """
    acc = _acc_dtype(u)
    b, d, _ = u.shape
    n = A.shape[1]
    uf = u.to(acc)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(acc)
    Bd = _per_channel(B.to(acc), d)
    Cd = _per_channel(C.to(acc), d)
    h = initial_state.to(acc) if initial_state is not None else uf.new_zeros(b, d, n)
    ys = []
    # unbind (not indexing) so that the backward stacks each gradient once instead of once per step.
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), uf.unbind(-1), Bd.unbind(-1), Cd.unbind(-1)):
        h = torch.exp(dt_t[..., None] * Af) * h + (dt_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(uf.shape)
    if D is not None:
        y = y + D.to(acc)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


__all__ = ["selective_scan_reference"]
