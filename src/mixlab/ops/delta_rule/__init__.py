"""The (gated) delta rule: DeltaNet when ``g`` is None, Gated DeltaNet otherwise.

Layout ``[B, T, H, D]``; state ``S`` ``[B, H, K, V]`` in float32. Per step t:
``S = exp(g_t) S;  u = beta_t (v_t - S^T k_t);  S = S + k_t u^T;  o_t = scale * S^T q_t``.
Semantics match fla's ``chunk_gated_delta_rule`` / ``chunk_delta_rule``.
"""

from __future__ import annotations

import torch

from .._backend import plain_precision, resolve_backend


def delta_rule(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the (gated) delta rule over a sequence.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` (in (0, 1) usually; any value allowed).
        g: ``[B, T, H]`` log-decay (<= 0), or None for DeltaNet.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with ``cu_seqlens``).
        output_final_state: also return the final state ``[N, H, K, V]`` (float32).
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (B must be 1); states never cross them.
        chunk_size: chunk length of the ``chunked`` backend (the Triton kernels use 64).
        backend: ``auto`` | ``reference`` | ``chunked`` | ``triton``.

    Returns:
        ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )
    impl = resolve_backend(backend, q)
    if impl == "reference":
        from .reference import delta_rule_reference

        with plain_precision(q):
            return delta_rule_reference(q, k, v, beta, g, **kwargs)
    if impl == "chunked":
        from .chunked import delta_rule_chunked

        with plain_precision(q):
            return delta_rule_chunked(q, k, v, beta, g, chunk_size=chunk_size, **kwargs)
    from .triton import delta_rule_recurrent_triton, delta_rule_triton

    if q.shape[1] <= RECURRENT_MAX_T and not _needs_grad(q, k, v, beta, g, initial_state):
        return delta_rule_recurrent_triton(q, k, v, beta, g, **kwargs)  # decode / short prefill: one kernel
    return delta_rule_triton(q, k, v, beta, g, **kwargs)


#: Inputs of at most this many tokens (with no gradient needed) take the fused token-by-token kernel.
RECURRENT_MAX_T = 64


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"delta_rule: q and k must be [B, T, H, K] and equal, got {tuple(q.shape)}, {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"delta_rule: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"delta_rule: beta must be [B, T, H] = {[B, T, H]}, got {list(beta.shape)}")
    if g is not None and g.shape != (B, T, H):
        raise ValueError(f"delta_rule: g must be [B, T, H] = {[B, T, H]}, got {list(g.shape)}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"delta_rule: with cu_seqlens the batch must be packed into B=1, got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"delta_rule: cu_seqlens must be 1-D, start at 0 and end at T={T}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (N, H, K, v.shape[-1]):
        raise ValueError(
            f"delta_rule: initial_state must be [N, H, K, V] = {[N, H, K, v.shape[-1]]}, "
            f"got {list(initial_state.shape)}"
        )


__all__ = ["delta_rule"]
