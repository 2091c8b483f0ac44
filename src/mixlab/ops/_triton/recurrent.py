"""Fused recurrent kernel for decoding: the (gated) delta rule or gated linear attention token by token.

One program per (V tile, sequence, head) keeps its state tile ``[K, BV]`` in float32 registers and
walks the tokens: ``S = exp(g_t) S``; ``u = β_t (v_t − Sᵀ k_t)`` (delta rule) or ``u = v_t``;
``S += k_t uᵀ``; ``o_t = scale · Sᵀ q_t``. Forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _recurrent_kernel(
    q,
    k,
    v,
    beta,
    g,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    HK: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_DELTA: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_s, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * HK + i_hk) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * HK + i_hk) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_G:
            b_h *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        if USE_DELTA:
            b_beta = tl.load(beta + t * H + i_h).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_s, b_h, mask=m_kv)


def recurrent_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_delta: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k ``[B, T, HK, K]``; v ``[B, T, H, V]``; beta/g ``[B, T, H]`` (contiguous). Returns
    ``(o [B, T, H, V], final state [N, H, K, V] float32 or None)``."""
    B, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 32 if BK <= 128 else 16)
    dummy = o
    if N > 0:
        _recurrent_kernel[(triton.cdiv(V, BV), N * H)](
            q, k, v, beta if beta is not None else dummy, g if g is not None else dummy, o,
            initial_state if initial_state is not None else dummy, ht if ht is not None else dummy,
            cu_seqlens if cu_seqlens is not None else dummy, scale, T,
            H=H, HK=HK, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, USE_DELTA=use_delta,
            USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=ht is not None,
            IS_VARLEN=cu_seqlens is not None, num_warps=4,
        )  # fmt: skip
    return o, ht
