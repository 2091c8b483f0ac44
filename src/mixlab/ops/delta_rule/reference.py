"""The (gated) delta rule as a step-by-step recurrence: the definition every other backend is tested against.

Per head, state ``S`` ``[K, V]``, and per step t (the order matters, and matches fla's naive recurrence):

    S   = exp(g_t) * S                    # decay first (g_t = 0 when g is None)
    u_t = beta_t * (v_t - S^T k_t)        # beta scales the prediction error
    S   = S + k_t u_t^T                   # rank-1 write
    o_t = scale * S^T q_t                 # read after the write

Slow (a Python loop over time) but obviously right, differentiable by autograd, float64-friendly.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 when the inputs are float64, else float32 (states are always at least float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of sequences. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta/g ``[B, T, H]``,
    state ``[B, H, K, V]`` (all in the compute dtype). Returns ``(o [B, T, H, V], state)``."""
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            state = state * g[:, t].exp()[..., None, None]
        k_t = k[:, t]  # [B, H, K]
        pred = torch.einsum("bhk,bhkv->bhv", k_t, state)
        u = beta[:, t, :, None] * (v[:, t] - pred)  # [B, H, V]
        state = state + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    if outs:
        o = torch.stack(outs, dim=1)
    else:
        o = v.new_zeros(v.shape)
    return o, state


def delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step (gated) delta rule. Shapes as :func:`mixlab.ops.delta_rule.delta_rule`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``; g: ``[B, T, H]`` log-decay or None.
        scale: query scale (default ``K ** -0.5``).
        initial_state: ``[N, H, K, V]`` or None (zeros).
        output_final_state: return the final state ``[N, H, K, V]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences in a ``B == 1`` batch; each sequence starts
            from its own initial state and yields its own final state.

    Returns:
        ``(o [B, T, H, V] in q's dtype, final state in float32 (float64 for float64 inputs) or None)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cdt = _compute_dtype(q)
    qf, kf, vf, bf = (x.to(cdt) for x in (q, k, v, beta))
    gf = g.to(cdt) if g is not None else None
    B, _, H, K = q.shape
    V = v.shape[-1]

    if cu_seqlens is None:
        s0 = initial_state.to(cdt) if initial_state is not None else qf.new_zeros(B, H, K, V)
        o, s = _recurrence(qf, kf, vf, bf, gf, scale, s0)
        return o.to(q.dtype), (s if output_final_state else None)

    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        s0 = initial_state[n : n + 1].to(cdt) if initial_state is not None else qf.new_zeros(1, H, K, V)
        o_n, s_n = _recurrence(
            qf[:, a:b], kf[:, a:b], vf[:, a:b], bf[:, a:b], gf[:, a:b] if gf is not None else None, scale, s0
        )
        outs.append(o_n)
        finals.append(s_n)
    o = torch.cat(outs, dim=1) if outs else vf.new_zeros(vf.shape)
    return o.to(q.dtype), (torch.cat(finals, dim=0) if output_final_state else None)


__all__ = ["delta_rule_reference"]
