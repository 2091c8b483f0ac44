"""The (gated) delta rule, chunkwise-parallel in plain PyTorch (the WY / UT-transform algorithm).

Per chunk of C tokens and per head (K, Q ``[C, d_k]``, V ``[C, d_v]``, beta, g ``[C]``):

1. ``G = cumsum(g)`` inside the chunk, ``gamma = exp(G)``, ``Gamma_ij = exp(G_i - G_j)`` for i >= j else 0.
2. ``A = strictly_lower(diag(beta) K K^T * Gamma)``; ``T = (I + A)^-1`` is unit lower-triangular.
3. ``U = T diag(beta) V``, ``W = T diag(beta * gamma) K``: the chunk's pseudo-values and the
   "keys" through which the incoming state is subtracted (the UT transform of the rank-1 updates).
4. Over chunks, state S ``[d_k, d_v]``: ``V_new = U - W S``;
   ``O = diag(gamma) Q S * scale + (Q K^T * scale * Gamma_incl) V_new``;
   ``S <- gamma_C S + (diag(gamma_C / gamma) K)^T V_new``.

Everything but step 4's two small matmuls per chunk is batched over (batch, heads, chunks) at once:
K K^T, the triangular solve (blocked forward substitution, batched over every chunk and head, with
one solve for U and W together; see :func:`unit_lower_solve`), Q K^T and, after the loop, both
output terms. Only the state recurrence is a Python loop, over T / C chunks. Differentiable by autograd.

A tail shorter than C is zero-padded (k = v = beta = g = 0): padded tokens neither write into the
state nor decay it, so padding changes nothing. Sequences shorter than C use one chunk of their length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _compute_dtype

#: Rows per diagonal block of :func:`unit_lower_solve` (a 64-token chunk is four blocks).
SOLVE_BLOCK = 16


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^-1`` for ``a [M, s, s]`` read strictly below its diagonal (the rest is ignored), by
    forward substitution over the s rows, every matrix at once: row i of the inverse is
    ``e_i - a[i, :i] T[:i]``. Stable: it only ever combines entries of the inverse itself."""
    s = a.shape[-1]
    t = a.new_zeros(a.shape)
    t.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    for i in range(1, s):
        torch.sum(a[:, i, :i, None] * t[:, :i, :i], dim=1, out=t[:, i, :i]).neg_()
    return t


class _UnitLowerSolve(torch.autograd.Function):
    """``X = (I + A)^-1 R`` for strictly lower ``A [M, C, C]`` (upper part and diagonal ignored) and
    ``R [M, C, W]``, by block forward substitution over blocks of ``SOLVE_BLOCK`` rows: the diagonal
    blocks are inverted (:func:`_unit_lower_inverse`), then ``X_I = T_II (R_I - A[I, :I] X[:I])``.

    Backward: ``dR = (I + A)^-T dX`` (the same substitution run upwards with the transposed blocks) and
    ``dA = -strictly_lower(dR X^T)``. Batched matmuls throughout, and no C x C buffer but ``dA``:
    about twice as fast as ``torch.linalg.solve_triangular`` forward + backward on the CPU, and as exact.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        C = A.shape[-1]
        bounds = [(s, min(s + SOLVE_BLOCK, C)) for s in range(0, C, SOLVE_BLOCK)]
        inv = _block_inverses(A, bounds)
        X = torch.empty_like(R)
        for (s, e), t in zip(bounds, inv):
            rhs = R[:, s:e]
            if s:
                rhs = torch.baddbmm(rhs, A[:, s:e, :s], X[:, :s], alpha=-1.0)
            X[:, s:e] = t @ rhs
        ctx.save_for_backward(A, X, *inv)
        ctx.bounds = bounds
        return X

    @staticmethod
    def backward(ctx, dX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        A, X, *inv = ctx.saved_tensors
        dR = torch.empty_like(dX)
        for (s, e), t in reversed(list(zip(ctx.bounds, inv))):
            rhs = dX[:, s:e]
            if e < A.shape[-1]:
                rhs = torch.baddbmm(rhs, A[:, e:, s:e].transpose(-1, -2), dR[:, e:], alpha=-1.0)
            dR[:, s:e] = t.transpose(-1, -2) @ rhs
        dA = torch.bmm(dR, X.transpose(-1, -2)).neg_().tril_(-1)
        return dA, dR


def _block_inverses(A: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverses of ``I +`` the diagonal blocks of ``A [M, C, C]``: the full-size blocks in one batch."""
    M = A.shape[0]
    full = [b for b in bounds if b[1] - b[0] == SOLVE_BLOCK]
    out: list[torch.Tensor] = []
    if full:
        n, s = len(full), SOLVE_BLOCK
        blocks = A[:, : n * s, : n * s].unflatten(1, (n, s)).unflatten(3, (n, s)).diagonal(dim1=1, dim2=3)
        t = _unit_lower_inverse(blocks.permute(0, 3, 1, 2).reshape(M * n, s, s))
        out = list(t.view(M, n, s, s).unbind(1))
    for s, e in bounds[len(full) :]:
        out.append(_unit_lower_inverse(A[:, s:e, s:e]))
    return out


def unit_lower_solve(A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``(I + strictly_lower(A))^-1 R`` for ``A [..., C, C]``, ``R [..., C, W]``: differentiable in both
    (the gradient of A is strictly lower). Entries of A on and above the diagonal are never read."""
    lead = R.shape[:-2]
    C, W = R.shape[-2:]
    X = _UnitLowerSolve.apply(A.reshape(-1, C, C), R.reshape(-1, C, W))
    return X.view(*lead, C, W)


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int, pad: int) -> torch.Tensor:
    """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]`` (time zero-padded at the end by ``pad``)."""
    x = x.movedim(1, 2)  # [B, H, T, *D]
    if pad:
        widths = [0, 0] * (x.dim() - 3) + [0, pad]
        x = F.pad(x, widths)
    return x.reshape(*x.shape[:2], n_chunks, chunk, *x.shape[3:])


def _chunked_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked batch, inputs in the compute dtype: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    beta/g ``[B, T, H]``, state ``[B, H, K, V]``. Returns ``(o [B, T, H, V], final state)``."""
    B, T, H, K = q.shape
    if T == 0:
        return v.new_zeros(v.shape), state
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    qc, kc, vc = (_to_chunks(x, N, C, pad) for x in (q, k, v))  # [B, H, N, C, D]
    bc = _to_chunks(beta, N, C, pad)  # [B, H, N, C]

    kb = kc * bc[..., None]
    A = kb @ kc.transpose(-1, -2)  # diag(beta) K K^T  [B, H, N, C, C]; the solve reads its strict lower part
    qkt = (qc * scale) @ kc.transpose(-1, -2)
    if g is not None:
        gc = _to_chunks(g, N, C, pad)  # [B, H, N, C]
        G = gc.cumsum(-1)
        # Gamma strictly below the diagonal; masked before exp because exp(G_i - G_j) for i < j can
        # overflow and inf * 0 would poison the gradient. The unit diagonal is added as a constant:
        # computing it as exp(G_i - G_i) gives g gradients +x and -x that cancel only up to rounding,
        # which swamps the true (tiny) gradient under strong decay. (In place: no op here needs
        # the value it overwrites for its gradient.)
        upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu()
        gam_strict = (G[..., :, None] - G[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
        A = A * gam_strict
        P = qkt * gam_strict
        P.diagonal(dim1=-2, dim2=-1).add_(qkt.diagonal(dim1=-2, dim2=-1))
        gamma = G.exp()[..., None]  # [B, H, N, C, 1]
        rhs_k = kb * gamma
    else:
        P = qkt.tril_()
        rhs_k = kb
    # (I + A)^{-1} [beta V | beta gamma K] in one batched forward substitution; the unit diagonal is implied.
    UW = unit_lower_solve(A, torch.cat([vc * bc[..., None], rhs_k], dim=-1))
    U, W = UW.split([vc.shape[-1], K], dim=-1)

    if g is not None:
        # What a chunk's token i is worth at the chunk's end: exp(G_C - G_i).
        # G_C - G_i as the sum of g after i (a reverse exclusive cumsum), not a difference of cumsums.
        to_end = F.pad(gc.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
        k_end = kc * to_end.exp()[..., None]
        decay_end = G[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
        decays = decay_end.unbind(2)
    else:
        k_end = kc
        decays = None
    # unbind (not indexing) so that autograd stacks the chunk gradients once instead of N full-size scatters.
    Us, Ws, KendT = U.unbind(2), W.unbind(2), k_end.transpose(-1, -2).unbind(2)
    states, v_news = [], []
    S = state
    for n in range(N):
        states.append(S)
        v_new = Us[n] - Ws[n] @ S  # [B, H, C, V]
        v_news.append(v_new)
        S = (S * decays[n] if decays is not None else S) + KendT[n] @ v_new
    S_in = torch.stack(states, dim=2)  # state entering each chunk [B, H, N, K, V]
    v_new = torch.stack(v_news, dim=2)  # [B, H, N, C, V]

    q_in = qc * scale if g is None else qc * (scale * gamma)
    o = q_in @ S_in + P @ v_new  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, -1)[:, :, :T].movedim(2, 1)
    return o, S


def delta_rule_chunked(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise (gated) delta rule; same contract as :func:`mixlab.ops.delta_rule.delta_rule`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``; g: ``[B, T, H]`` log-decay or None.
        scale: query scale (default ``K ** -0.5``).
        initial_state: ``[N, H, K, V]`` or None (zeros).
        output_final_state: return the final state ``[N, H, K, V]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences in a ``B == 1`` batch (each run on its own).
        chunk_size: tokens per chunk (64 balances the O(C^2) intra-chunk work against the sequential loop).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final state in float32 (float64 for float64 inputs) or None)``.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"delta_rule_chunked: chunk_size must be a positive int, got {chunk_size!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cdt = _compute_dtype(q)
    qf, kf, vf, bf = (x.to(cdt) for x in (q, k, v, beta))
    gf = g.to(cdt) if g is not None else None
    B, _, H, K = q.shape
    V = v.shape[-1]

    if cu_seqlens is None:
        s0 = initial_state.to(cdt) if initial_state is not None else qf.new_zeros(B, H, K, V)
        o, s = _chunked_dense(qf, kf, vf, bf, gf, scale, s0, chunk_size)
        return o.to(q.dtype), (s if output_final_state else None)

    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        s0 = initial_state[n : n + 1].to(cdt) if initial_state is not None else qf.new_zeros(1, H, K, V)
        o_n, s_n = _chunked_dense(
            qf[:, a:b],
            kf[:, a:b],
            vf[:, a:b],
            bf[:, a:b],
            gf[:, a:b] if gf is not None else None,
            scale,
            s0,
            chunk_size,
        )
        outs.append(o_n)
        finals.append(s_n)
    o = torch.cat(outs, dim=1) if outs else vf.new_zeros(vf.shape)
    return o.to(q.dtype), (torch.cat(finals, dim=0) if output_final_state else None)


__all__ = ["delta_rule_chunked", "unit_lower_solve"]
