"""Chunkwise Triton kernels for the gated delta rule and gated linear attention (Mamba2's SSD).

One kernel family serves three mixers (DESIGN.md §2). Per chunk of ``BT = 64`` tokens and per head,
with ``G = cumsum(g)`` inside the chunk, ``γ = exp(G)`` and ``Γ_ij = exp(G_i − G_j)``:

* delta rule (``USE_DELTA``): ``A = strictly_lower(diag(β) K Kᵀ ⊙ Γ)``, ``T = (I + A)⁻¹`` (blocked
  inversion: forward substitution on the 16×16 diagonal blocks, then the off-diagonal blocks by
  products; a latency-bound step, so it runs in its own few-warp kernel), ``W = T diag(βγ) K``,
  ``U = T diag(β) V``; across chunks ``V_new = U − W S``.
* gated linear attention (SSD): ``V_new = V`` (no T, no W).

Scaled values (``XD``, SSD only): ``V = x·d`` is formed on load from ``x`` (any token stride, e.g. a view
of Mamba2's conv output) and a per-(token, head) float32 factor ``d`` (dt after its softplus), rounded
to the input dtype as a materialised ``V`` would be; an optional skip adds ``D·x`` to the forward's output.
The forward never writes ``V``; the backward's state recompute writes it once for ``dqkwg`` and returns dV.

Then ``O = scale·(diag(γ) Q S + (Q Kᵀ ⊙ Γ_incl) V_new)`` and ``S ← γ_C S + (diag(γ_C/γ) K)ᵀ V_new``.

Tensors are handled as packed token streams: ``[B, T, H, D]`` is viewed as ``[B·T, H, D]`` and a
sequence is a token range ``[bos, eos)`` (``cu_seqlens`` for varlen, ``n·T`` otherwise), so states
never cross sequences. Queries/keys may have fewer heads ``HK`` than values (``H % HK == 0``; SSD's
groups). Dots take operands in the input dtype and accumulate in float32; states are float32 in
registers and stored per chunk (``h``) in the input dtype.

Backward is recompute-based: the forward saves ``T`` (float32, 64 values per token and head), ``W``
and ``U`` (input dtype; together as large as k and v); the backward recomputes the
per-chunk states, runs a reverse sequential pass for the state gradients and ``dV_new`` (whose
intra-chunk part it forms itself where that pays, see ``CONFIG["bwd_dh"]``, else a parallel kernel
does), and two parallel passes for ``dq, dk, dw, dg`` and the WY (``T``) backward. Gate gradients
are accumulated per position of the cumulative sum ``G`` and turned into ``dg`` with a reverse
cumulative sum inside each chunk.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import tempfile
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

BT = 64  # chunk length (tokens)


# --------------------------------------------------------------------------------------------------
# kernels
#
# Helpers are written inline on purpose: under TRITON_INTERPRET=1 every call of a nested
# ``@triton.jit`` function re-patches ``triton.language`` (milliseconds each), which made the CPU
# tests many times slower. Recurring snippets:
#   chunk bounds     i_n (sequence), i_t (chunk in it), [bos, eos) its tokens, t0 the chunk's first
#   rows / m_t       token indices of the chunk's BT rows (int64) / which of them are inside the sequence
#   b_g / b_glast    G = cumsum(g) over the chunk (float32; padded rows repeat the last value) / G at its end
# --------------------------------------------------------------------------------------------------


@triton.jit
def _kkt_solve_kernel(
    k, beta, g, Tm, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, ROW_REGS: tl.constexpr = False, PHASE: tl.constexpr = 0,
):  # fmt: skip
    """Per (chunk, head): ``T = (I + A)⁻¹`` with ``A = strictly_lower(diag(β) K Kᵀ ⊙ Γ)``, into ``Tm``
    [Ntok, H, BT] float32. ``A`` is staged in ``Tm`` itself; a few warps suffice (latency-bound loop).
    ``PHASE`` 1 only forms and stores ``A``, 2 only inverts the stored ``A`` (0: both): two launches, so
    the register-light, latency-bound solve is not held to the occupancy of the K Kᵀ product."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    p_k = k + rows[:, None] * (HK * K) + i_hk * K

    if PHASE != 2:
        b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_k = tl.load(p_k + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
            b_A += tl.dot(b_k, tl.trans(b_k), input_precision="ieee")
        m_s = o_t[:, None] > o_t[None, :]
        if USE_G:
            b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
            b_A = b_A * tl.exp(tl.where(m_s, b_g[:, None] - b_g[None, :], 0.0))
        b_A = tl.where(m_s, b_A * b_beta[:, None], 0.0)
        tl.store(Tm + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], b_A, mask=m_t[:, None])
        tl.debug_barrier()
    if PHASE == 1:
        return

    # Blocked inversion of the unit lower-triangular (I + A). Diagonal 16×16 blocks by forward
    # substitution, the four blocks side by side: row i of (I + a)⁻¹ − I is −a_i − Σ_j a_ij (row j);
    # rows of a are read back from Tm.
    o_i = tl.arange(0, 16)
    s16 = 16 * H * BT
    p16 = Tm + (t0 + o_i).to(tl.int64)[:, None] * (H * BT) + i_h * BT + o_i[None, :]  # block (0, 0)
    m0 = ((t0 + o_i) < eos)[:, None]
    m1 = ((t0 + 16 + o_i) < eos)[:, None]
    m2 = ((t0 + 32 + o_i) < eos)[:, None]
    m3 = ((t0 + 48 + o_i) < eos)[:, None]
    b_X00 = -tl.load(p16, mask=m0, other=0.0)
    b_X11 = -tl.load(p16 + s16 + 16, mask=m1, other=0.0)
    b_X22 = -tl.load(p16 + 2 * s16 + 32, mask=m2, other=0.0)
    b_X33 = -tl.load(p16 + 3 * s16 + 48, mask=m3, other=0.0)
    p_r = Tm + (t0 + o_i * 0).to(tl.int64) * (H * BT) + i_h * BT + o_i  # row 0 of block (0, 0), as a vector
    # ROW_REGS: take row i from the register tile (not yet updated, so still −a_i) instead of a load from
    # L2 inside the serial loop; the loads do not depend on the loop but are not hoisted by the compiler.
    for i in range(2, 16):
        sel = o_i[:, None] == i
        if ROW_REGS:
            b_a = tl.sum(tl.where(sel, b_X00, 0.0), 0)
        else:
            b_a = -tl.load(p_r + i * H * BT, mask=(t0 + i + o_i * 0) < eos, other=0.0)
        b_a = b_a + tl.sum(b_a[:, None] * b_X00, 0)
        b_X00 = tl.where(sel, b_a[None, :], b_X00)
        if ROW_REGS:
            b_a = tl.sum(tl.where(sel, b_X11, 0.0), 0)
        else:
            b_a = -tl.load(p_r + (16 + i) * H * BT + 16, mask=(t0 + 16 + i + o_i * 0) < eos, other=0.0)
        b_a = b_a + tl.sum(b_a[:, None] * b_X11, 0)
        b_X11 = tl.where(sel, b_a[None, :], b_X11)
        if ROW_REGS:
            b_a = tl.sum(tl.where(sel, b_X22, 0.0), 0)
        else:
            b_a = -tl.load(p_r + (32 + i) * H * BT + 32, mask=(t0 + 32 + i + o_i * 0) < eos, other=0.0)
        b_a = b_a + tl.sum(b_a[:, None] * b_X22, 0)
        b_X22 = tl.where(sel, b_a[None, :], b_X22)
        if ROW_REGS:
            b_a = tl.sum(tl.where(sel, b_X33, 0.0), 0)
        else:
            b_a = -tl.load(p_r + (48 + i) * H * BT + 48, mask=(t0 + 48 + i + o_i * 0) < eos, other=0.0)
        b_a = b_a + tl.sum(b_a[:, None] * b_X33, 0)
        b_X33 = tl.where(sel, b_a[None, :], b_X33)
    b_I = (o_i[:, None] == o_i[None, :]).to(tl.float32)
    b_X00 += b_I
    b_X11 += b_I
    b_X22 += b_I
    b_X33 += b_I
    # off-diagonal blocks: X_ij = −X_ii Σ_{k=j}^{i−1} A_ik X_kj
    b_A10 = tl.load(p16 + s16, mask=m1, other=0.0)
    b_A20 = tl.load(p16 + 2 * s16, mask=m2, other=0.0)
    b_A21 = tl.load(p16 + 2 * s16 + 16, mask=m2, other=0.0)
    b_A30 = tl.load(p16 + 3 * s16, mask=m3, other=0.0)
    b_A31 = tl.load(p16 + 3 * s16 + 16, mask=m3, other=0.0)
    b_A32 = tl.load(p16 + 3 * s16 + 32, mask=m3, other=0.0)
    P: tl.constexpr = "ieee"
    b_X10 = -tl.dot(tl.dot(b_X11, b_A10, input_precision=P), b_X00, input_precision=P)
    b_X21 = -tl.dot(tl.dot(b_X22, b_A21, input_precision=P), b_X11, input_precision=P)
    b_X32 = -tl.dot(tl.dot(b_X33, b_A32, input_precision=P), b_X22, input_precision=P)
    b_S = tl.dot(b_A20, b_X00, input_precision=P) + tl.dot(b_A21, b_X10, input_precision=P)
    b_X20 = -tl.dot(b_X22, b_S, input_precision=P)
    b_S = tl.dot(b_A31, b_X11, input_precision=P) + tl.dot(b_A32, b_X21, input_precision=P)
    b_X31 = -tl.dot(b_X33, b_S, input_precision=P)
    b_S = (
        tl.dot(b_A30, b_X00, input_precision=P)
        + tl.dot(b_A31, b_X10, input_precision=P)
        + tl.dot(b_A32, b_X20, input_precision=P)
    )
    b_X30 = -tl.dot(b_X33, b_S, input_precision=P)
    tl.debug_barrier()
    tl.store(p16, b_X00, mask=m0)
    tl.store(p16 + s16, b_X10, mask=m1)
    tl.store(p16 + s16 + 16, b_X11, mask=m1)
    tl.store(p16 + 2 * s16, b_X20, mask=m2)
    tl.store(p16 + 2 * s16 + 16, b_X21, mask=m2)
    tl.store(p16 + 2 * s16 + 32, b_X22, mask=m2)
    tl.store(p16 + 3 * s16, b_X30, mask=m3)
    tl.store(p16 + 3 * s16 + 16, b_X31, mask=m3)
    tl.store(p16 + 3 * s16 + 32, b_X32, mask=m3)
    tl.store(p16 + 3 * s16 + 48, b_X33, mask=m3)


@triton.jit
def _wu_fwd_kernel(
    k, v, beta, g, Tm, w, u, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Per (chunk, head): ``W = T diag(βγ) K`` and ``U = T diag(β) V`` in the input dtype."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    dt = k.dtype.element_ty
    p_k = k + rows[:, None] * (HK * K) + i_hk * K

    b_T = tl.load(Tm + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], mask=m_t[:, None], other=0.0).to(dt)
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if USE_G:
        b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
        b_bg = b_beta * tl.exp(b_g)
    else:
        b_bg = b_beta
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(p_k + o_k[None, :], mask=m_k, other=0.0)
        b_w = tl.dot(b_T, (b_k * b_bg[:, None]).to(dt), input_precision="ieee")
        tl.store(w + rows[:, None] * (H * K) + i_h * K + o_k[None, :], b_w.to(dt), mask=m_k)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = m_t[:, None] & (o_v < V)[None, :]
        p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_v, other=0.0)
        b_u = tl.dot(b_T, (b_v * b_beta[:, None]).to(dt), input_precision="ieee")
        tl.store(u + p_v, b_u.to(dt), mask=m_v)


@triton.jit
def _fwd_h_kernel(
    k, v, w, g, h, vn, h0, ht, cu_seqlens, chunk_offsets, xd, hs, SVT, T, NT, SEG,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_DELTA: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, SAVE_VNEW: tl.constexpr,
    IS_VARLEN: tl.constexpr, XD: tl.constexpr, SAVE_SEG: tl.constexpr = False, FROM_SEG: tl.constexpr = False,
):  # fmt: skip
    """Sequential over the chunks of one (sequence, head, V tile): states ``h`` [NC, H, K, V] entering
    each chunk, and ``V_new`` (``U − W S`` with the delta rule, ``v`` holding ``U``; else ``v``).
    ``XD``: ``v`` holds x (token stride ``SVT``) and V = x·d with ``d = xd [NTOK, H]``, written to ``vn`` with
    ``SAVE_VNEW`` (the backward's ``dqkwg`` reads it there).
    Segments of ``SEG`` chunks (equal-length sequences only, see :func:`recompute_segment_chunks`): ``SAVE_SEG``
    stores the float32 state entering each segment in ``hs`` [N·⌈NT/SEG⌉, H, K, V]; ``FROM_SEG`` (grid axis 2: the
    segment) runs one segment from its stored state, so a sequence's segments run in parallel."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        nt = tl.cdiv(eos - bos, BT)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
        nt = NT
        c0 = i_n * NT
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    dt = k.dtype.element_ty
    p_s = o_k[:, None] * V + o_v[None, :]
    s0 = i_n * tl.cdiv(NT, SEG)  # the sequence's first segment (SAVE_SEG / FROM_SEG)

    t_lo = 0
    t_hi = nt
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if FROM_SEG:
        i_s = tl.program_id(2)
        t_lo = tl.minimum(i_s * SEG, nt)
        t_hi = tl.minimum(t_lo + SEG, nt)
        p_hs = hs + ((s0 + i_s).to(tl.int64) * H + i_h) * K * V + p_s
        b_h += tl.load(p_hs, mask=m_kv & (o_k * 0 + t_lo < t_hi)[:, None], other=0.0)
    elif USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_s, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(t_lo, t_hi):
        t0 = bos + i_t * BT
        m_t = (t0 + o_t) < eos
        rows = (t0 + o_t).to(tl.int64)
        if SAVE_SEG:  # noqa: SIM102 (a compile-time switch around a runtime branch)
            # a branch, not a store masked off between segments: the store's layout conversion of b_h (through shared
            # memory) would run every chunk (H100, SSD at T = 32K: fwd_ho 1.84 -> 1.94 ms with the masked store)
            if i_t % SEG == 0:
                tl.store(hs + ((s0 + i_t // SEG).to(tl.int64) * H + i_h) * K * V + p_s, b_h, mask=m_kv)
        tl.store(h + ((c0 + i_t).to(tl.int64) * H + i_h) * K * V + p_s, b_h.to(dt), mask=m_kv)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        b_k = tl.load(k + rows[:, None] * (HK * K) + i_hk * K + o_k[None, :], mask=m_k, other=0.0)
        if XD:
            b_x = tl.load(v + rows[:, None] * SVT + i_h * V + o_v[None, :], mask=m_v, other=0.0).to(tl.float32)
            b_vd = (b_x * tl.load(xd + rows * H + i_h, mask=m_t, other=0.0)[:, None]).to(dt)
            if SAVE_VNEW:
                tl.store(vn + p_v, b_vd, mask=m_v)
            b_v = b_vd.to(tl.float32)
        else:
            b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_DELTA:
            b_w = tl.load(w + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_k, other=0.0)
            b_v -= tl.dot(b_w, b_h.to(dt), input_precision="ieee")
            if SAVE_VNEW:
                tl.store(vn + p_v, b_v.to(dt), mask=m_v)
        if USE_G:
            b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
            b_glast = tl.sum(tl.where(o_t == BT - 1, b_g, 0.0), axis=0)
            b_v = b_v * tl.exp(b_glast - b_g)[:, None]
            b_h *= tl.exp(b_glast)
        b_h += tl.dot(tl.trans(b_k), b_v.to(dt), input_precision="ieee")
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_s, b_h, mask=m_kv)


@triton.jit
def _fwd_ho_kernel(
    q, k, v, w, g, o, h0, ht, cu_seqlens, xd, Dp, hs, SVT, scale, T, NT, SEG,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_DELTA: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    XD: tl.constexpr, HAS_D: tl.constexpr, D_PER_V: tl.constexpr, PREFETCH_V: tl.constexpr = False,
    SAVE_SEG: tl.constexpr = False, PREFETCH_G: tl.constexpr = False, G_CUM: tl.constexpr = False,
):  # fmt: skip
    """The forward's state pass and output in one sequential kernel per (sequence, head, V tile): each chunk's
    ``O = scale·(diag(γ) Q S + (Q Kᵀ ⊙ Γ_incl) V_new)`` is formed from the state ``S`` in registers, so the
    chunk states ``h`` and ``V_new`` are never written (the backward recomputes them with ``_fwd_h_kernel``).
    Same roundings as ``_fwd_h_kernel`` + ``_fwd_o_kernel``: S and V_new enter the products in the input dtype.
    ``XD``: V = x·d as in ``_fwd_h_kernel``; ``HAS_D``: ``O += D·x`` (D ``[H]``, or ``[H, V]`` with ``D_PER_V``);
    ``PREFETCH_V``: the ``v`` / ``x`` tile, which the compiler does not pipeline (it is used elementwise before
    its products), is loaded a chunk ahead; ``PREFETCH_G`` likewise the gate row. ``G_CUM``: ``g`` holds the gate's
    cumulative sum inside each chunk (:func:`_chunk_gate_cumsum`), so the loop runs no scan and no reduction for
    the chunk's last value (a scalar load). ``SAVE_SEG``: the states entering each segment, as ``_fwd_h_kernel``'s."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        nt = tl.cdiv(eos - bos, BT)
    else:
        bos = i_n * T
        eos = bos + T
        nt = NT
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    m_i = o_t[:, None] >= o_t[None, :]
    dt = k.dtype.element_ty
    p_s = o_k[:, None] * V + o_v[None, :]

    if HAS_D:
        if D_PER_V:
            b_D = tl.load(Dp + i_h * V + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
        else:
            b_D = tl.load(Dp + i_h).to(tl.float32)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_s, mask=m_kv, other=0.0).to(tl.float32)
    if XD:
        s_x = SVT  # token stride of x
    else:
        s_x = H * V
    # the tile's addresses are formed from the rows each chunk: a loop-carried [BT, BV] pointer tile would hold 64-bit
    # addresses across the loop (Triton 3.6, sm_90: 0 -> 304 bytes of spills in SSD's launch)
    s0 = i_n * tl.cdiv(NT, SEG)  # the sequence's first segment (SAVE_SEG)
    if USE_G and PREFETCH_G:
        b_gn = tl.load(g + (bos + o_t).to(tl.int64) * H + i_h, mask=(bos + o_t) < eos, other=0.0)
        if G_CUM:
            b_gln = tl.load(g + (tl.minimum(bos + BT, eos) - 1).to(tl.int64) * H + i_h, mask=bos < eos, other=0.0)
    if PREFETCH_V:
        r_0 = (bos + o_t).to(tl.int64)
        b_xn = tl.load(v + r_0[:, None] * s_x + i_h * V + o_v[None, :], mask=(r_0 < eos)[:, None] & (o_v < V)[None, :],
                       other=0.0)  # fmt: skip
    for i_t in range(nt):
        t0 = bos + i_t * BT
        m_t = (t0 + o_t) < eos
        rows = (t0 + o_t).to(tl.int64)
        if SAVE_SEG:  # noqa: SIM102 (as in _fwd_h_kernel)
            if i_t % SEG == 0:
                tl.store(hs + ((s0 + i_t // SEG).to(tl.int64) * H + i_h) * K * V + p_s, b_h, mask=m_kv)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        p_qk = rows[:, None] * (HK * K) + i_hk * K + o_k[None, :]
        b_q = tl.load(q + p_qk, mask=m_k, other=0.0)
        b_k = tl.load(k + p_qk, mask=m_k, other=0.0)
        if PREFETCH_V:
            b_x = b_xn.to(tl.float32)
            r_n = rows + BT
            b_xn = tl.load(v + r_n[:, None] * s_x + i_h * V + o_v[None, :], mask=(r_n < eos)[:, None] & (o_v < V)[None, :],
                           other=0.0)  # fmt: skip
        else:
            b_x = tl.load(v + rows[:, None] * s_x + i_h * V + o_v[None, :], mask=m_v, other=0.0).to(tl.float32)
        if XD:
            b_v = (b_x * tl.load(xd + rows * H + i_h, mask=m_t, other=0.0)[:, None]).to(dt).to(tl.float32)
        else:
            b_v = b_x
        b_hd = b_h.to(dt)
        b_o = tl.dot(b_q, b_hd, input_precision="ieee")
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        if USE_DELTA:
            b_w = tl.load(w + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_k, other=0.0)
            b_v -= tl.dot(b_w, b_hd, input_precision="ieee")
        b_vd = b_v.to(dt)
        if USE_G:
            if PREFETCH_G:
                b_graw = b_gn
                b_gn = tl.load(g + (rows + BT) * H + i_h, mask=(t0 + BT + o_t) < eos, other=0.0)
                if G_CUM:
                    b_glast = b_gln
                    b_gln = tl.load(g + (tl.minimum(t0 + 2 * BT, eos) - 1).to(tl.int64) * H + i_h, mask=t0 + BT < eos,
                                    other=0.0)  # fmt: skip
            else:
                b_graw = tl.load(g + rows * H + i_h, mask=m_t, other=0.0)
                if G_CUM:
                    b_glast = tl.load(g + (tl.minimum(t0 + BT, eos) - 1).to(tl.int64) * H + i_h)
            if G_CUM:  # padded rows take the last value, as the scan gives them
                b_g = tl.where(m_t, b_graw, b_glast)
            else:
                b_g = tl.cumsum(b_graw.to(tl.float32), axis=0)
                b_glast = tl.sum(tl.where(o_t == BT - 1, b_g, 0.0), axis=0)
            b_o = b_o * tl.exp(b_g)[:, None]
            b_A = b_A * tl.exp(tl.where(m_i, b_g[:, None] - b_g[None, :], 0.0))
        b_A = tl.where(m_i, b_A, 0.0)
        b_o = (b_o + tl.dot(b_A.to(dt), b_vd, input_precision="ieee")) * scale
        if HAS_D:
            b_o += b_x * b_D
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if USE_G:
            b_vd = (b_v * tl.exp(b_glast - b_g)[:, None]).to(dt)
            b_h *= tl.exp(b_glast)
        b_h += tl.dot(tl.trans(b_k), b_vd, input_precision="ieee")
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_s, b_h, mask=m_kv)


@triton.jit
def _fwd_o_kernel(
    q, k, vn, g, h, o, cu_seqlens, chunk_indices, xd, Dp, SVT, scale, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
    XD: tl.constexpr, HAS_D: tl.constexpr, D_PER_V: tl.constexpr,
):  # fmt: skip
    """``O = scale·(diag(γ) Q S + (Q Kᵀ ⊙ Γ_incl) V_new)`` per (V tile, chunk, head); ``XD`` / ``HAS_D`` as in
    ``_fwd_ho_kernel``."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    dt = q.dtype.element_ty
    p_qk = rows[:, None] * (HK * K) + i_hk * K
    p_h = h + (i_c.to(tl.int64) * H + i_h) * K * V + o_v[None, :]

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + p_qk + o_k[None, :], mask=m_k, other=0.0)
        b_k = tl.load(k + p_qk + o_k[None, :], mask=m_k, other=0.0)
        b_h = tl.load(p_h + o_k[:, None] * V, mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision="ieee")
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    m_i = o_t[:, None] >= o_t[None, :]
    if USE_G:
        b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
        b_o = b_o * tl.exp(b_g)[:, None]
        b_A = b_A * tl.exp(tl.where(m_i, b_g[:, None] - b_g[None, :], 0.0))
    b_A = tl.where(m_i, b_A, 0.0)
    m_v = m_t[:, None] & (o_v < V)[None, :]
    p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
    if XD:
        b_x = tl.load(vn + rows[:, None] * SVT + i_h * V + o_v[None, :], mask=m_v, other=0.0).to(tl.float32)
        b_v = b_x * tl.load(xd + rows * H + i_h, mask=m_t, other=0.0)[:, None]
    else:
        b_v = tl.load(vn + p_v, mask=m_v, other=0.0)
    b_o = (b_o + tl.dot(b_A.to(dt), b_v.to(dt), input_precision="ieee")) * scale
    if HAS_D:
        if D_PER_V:
            b_o += b_x * tl.load(Dp + i_h * V + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
        else:
            b_o += b_x * tl.load(Dp + i_h).to(tl.float32)
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_v)


@triton.jit
def _bwd_dv_local_kernel(
    q, k, g, do, dv, cu_seqlens, chunk_indices, scale, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
    HB: tl.constexpr = 1,
):  # fmt: skip
    """Intra-chunk part of ``dV_new``: ``scale·(Q Kᵀ ⊙ Γ_incl)ᵀ dO`` per (chunk, block of ``HB`` value heads).
    The heads of a block share one query/key head (``HB`` divides ``H // HK``), so ``Q Kᵀ`` is formed once per
    block and only the gate mask and ``dO`` are per head (SSD: 64 heads on one B/C group)."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    i_hk = (i_b * HB) // (H // HK)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    dt = q.dtype.element_ty
    p_qk = rows[:, None] * (HK * K) + i_hk * K

    b_A = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i] = k_j · q_i
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + p_qk + o_k[None, :], mask=m_k, other=0.0)
        b_k = tl.load(k + p_qk + o_k[None, :], mask=m_k, other=0.0)
        b_A += tl.dot(b_k, tl.trans(b_q), input_precision="ieee")
    m_u = o_t[:, None] <= o_t[None, :]
    b_A = tl.where(m_u, b_A, 0.0) * scale
    for i_j in range(HB):
        i_h = i_b * HB + i_j
        if USE_G:
            b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
            b_Ah = (b_A * tl.exp(tl.where(m_u, b_g[None, :] - b_g[:, None], 0.0))).to(dt)
        else:
            b_Ah = b_A.to(dt)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = m_t[:, None] & (o_v < V)[None, :]
            p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
            b_do = tl.load(do + p_v, mask=m_v, other=0.0)
            b_dv = tl.dot(b_Ah, b_do.to(dt), input_precision="ieee")
            tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_v)


@triton.jit
def _bwd_dh_kernel(
    q, k, w, g, do, dvl, dh, dvn, dht, dh0, cu_seqlens, chunk_offsets, scale, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_DELTA: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
    LOCAL_DV: tl.constexpr = False, PREFETCH_G: tl.constexpr = False,
):  # fmt: skip
    """Reverse sequential pass: ``dh`` [NC, H, K, V] (gradient of the state leaving each chunk) and
    ``dV_new = dvl + diag(γ_C/γ) K dh``; ``dS ← γ_C dS + scale·(diag(γ) Q)ᵀ dO − Wᵀ dV_new``.
    ``LOCAL_DV``: the intra-chunk ``dvl = scale·(Q Kᵀ ⊙ Γ_incl)ᵀ dO`` (``_bwd_dv_local_kernel``'s) is formed
    here from the q, k and dO tiles the pass loads anyway, in float32, instead of read from ``dvl``. ``PREFETCH_G``:
    the gate row of the chunk before is loaded a chunk ahead (the compiler does not pipeline this elementwise load)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        nt = tl.cdiv(eos - bos, BT)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
        nt = NT
        c0 = i_n * NT
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    dt = q.dtype.element_ty
    p_s = o_k[:, None] * V + o_v[None, :]

    if USE_G and PREFETCH_G:
        r_l = (bos + (nt - 1) * BT + o_t).to(tl.int64)
        b_gn = tl.load(g + r_l * H + i_h, mask=(r_l >= bos) & (r_l < eos), other=0.0)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_s, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(nt):
        i_t = nt - 1 - i_r
        t0 = bos + i_t * BT
        m_t = (t0 + o_t) < eos
        rows = (t0 + o_t).to(tl.int64)
        tl.store(dh + ((c0 + i_t).to(tl.int64) * H + i_h) * K * V + p_s, b_dh.to(dt), mask=m_kv)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        m_v = m_t[:, None] & (o_v < V)[None, :]
        p_qk = rows[:, None] * (HK * K) + i_hk * K + o_k[None, :]
        p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        b_q = tl.load(q + p_qk, mask=m_k, other=0.0)
        b_k = tl.load(k + p_qk, mask=m_k, other=0.0)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0)
        b_dv = tl.dot(b_k, b_dh.to(dt), input_precision="ieee")
        if USE_G:
            if PREFETCH_G:
                b_graw = b_gn
                b_gn = tl.load(g + (rows - BT) * H + i_h, mask=(t0 - BT + o_t) >= bos, other=0.0)
            else:
                b_graw = tl.load(g + rows * H + i_h, mask=m_t, other=0.0)
            b_g = tl.cumsum(b_graw.to(tl.float32), axis=0)
            b_glast = tl.sum(tl.where(o_t == BT - 1, b_g, 0.0), axis=0)
            b_dv = b_dv * tl.exp(b_glast - b_g)[:, None]
            b_qs = (b_q * (tl.exp(b_g) * scale)[:, None]).to(dt)
            b_dh *= tl.exp(b_glast)
        else:
            b_qs = (b_q * scale).to(dt)
        if LOCAL_DV:
            b_A = tl.dot(b_k, tl.trans(b_q), input_precision="ieee")  # [j, i] = k_j · q_i
            m_u = o_t[:, None] <= o_t[None, :]
            if USE_G:
                b_A = b_A * tl.exp(tl.where(m_u, b_g[None, :] - b_g[:, None], 0.0))
            b_A = (tl.where(m_u, b_A, 0.0) * scale).to(dt)
            b_dv += tl.dot(b_A, b_do.to(dt), input_precision="ieee")
        else:
            b_dv += tl.load(dvl + p_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(dvn + p_v, b_dv.to(dvn.dtype.element_ty), mask=m_v)
        b_dh += tl.dot(tl.trans(b_qs), b_do.to(dt), input_precision="ieee")
        if USE_DELTA:
            b_w = tl.load(w + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_k, other=0.0)
            b_dh -= tl.dot(tl.trans(b_w), b_dv.to(dt), input_precision="ieee")
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_s, b_dh, mask=m_kv)


@triton.jit
def _bwd_dqkwg_kernel(
    q, k, vn, g, h, do, dh, dvn, dq, dk, dw, dG, cu_seqlens, chunk_indices, scale, T, NT, NTOK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, USE_DELTA: tl.constexpr,
    IS_VARLEN: tl.constexpr, LEAN: tl.constexpr = False, G_CUM: tl.constexpr = False,
):  # fmt: skip
    """Per (K tile, chunk, query/key head): ``dq``, ``dk`` summed over the value heads that share the
    query/key head (all but the WY part of dk), per value head ``dw = −dV_new Sᵀ`` (input dtype) and
    this K tile's share of ``dG`` (gradient w.r.t. G = cumsum(g)) into ``dG[i_k]`` [NS, Ntok, H].

    SSD (many value heads per key head) runs ``_bwd_dp_sum_kernel`` + ``_bwd_dqkg_inter_kernel`` instead by default
    (``CONFIG["dqkwg_ssd"]["split"]``).

    ``LEAN`` (with ``USE_G`` only; fewer live registers, same sums up to summation order): q and k for dG are
    read again after the V loop instead of held in float32 across it, dw is stored right after the loop,
    Σ h⊙dh is reduced to one scalar every V step instead of a [BK] vector, and dG_last's Σ dk⊙k is one flat
    reduction. sm_90, K = V = 128, BK 64 BV 32, 8 warps: 154 → 128 registers with Triton 3.6, no spill, i.e.
    two CTAs per SM (Triton 3.9: 138)."""
    i_k, i_c, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NG: tl.constexpr = H // HK
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = m_t[:, None] & (o_k < K)[None, :]
    m_i = o_t[:, None] >= o_t[None, :]
    dt = q.dtype.element_ty

    p_qk = rows[:, None] * (HK * K) + i_hk * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_k, other=0.0)
    b_k = tl.load(k + p_qk, mask=m_k, other=0.0)
    if not LEAN:
        b_qf = b_q.to(tl.float32)
        b_kf = b_k.to(tl.float32)
    b_dq_sum = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk_sum = tl.zeros([BT, BK], dtype=tl.float32)
    for i_g in range(NG):
        i_h = i_hk * NG + i_g
        p_s = (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        b_dP = tl.zeros([BT, BT], dtype=tl.float32)
        b_hdh = tl.zeros([1 if LEAN else BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
            m_v = m_t[:, None] & (o_v < V)[None, :]
            p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
            b_h = tl.load(h + p_s + o_v[None, :], mask=m_kv, other=0.0)
            b_dh = tl.load(dh + p_s + o_v[None, :], mask=m_kv, other=0.0)
            b_v = tl.load(vn + p_v, mask=m_v, other=0.0).to(dt)
            b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(dt)
            b_dq += tl.dot(b_do, tl.trans(b_h), input_precision="ieee")
            b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision="ieee")
            b_dP += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
            if USE_DELTA:
                b_dv = tl.load(dvn + p_v, mask=m_v, other=0.0).to(dt)
                b_dw += tl.dot(b_dv, tl.trans(b_h), input_precision="ieee")
            if USE_G:
                b_hh = b_h.to(tl.float32) * b_dh.to(tl.float32)
                if LEAN:
                    b_hdh += tl.sum(tl.sum(b_hh, axis=1), axis=0)
                else:
                    b_hdh += tl.sum(b_hh, axis=1)
        if LEAN:
            if USE_DELTA:
                p_w = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
                tl.store(dw + p_w, (-b_dw).to(dw.dtype.element_ty), mask=m_k)
            b_qf = tl.load(q + p_qk, mask=m_k, other=0.0).to(tl.float32)
            b_kf = tl.load(k + p_qk, mask=m_k, other=0.0).to(tl.float32)
        if USE_G:
            if G_CUM:  # g holds G (see _fwd_ho_kernel); padded rows take the last value, as the scan gives them
                b_glast = tl.load(g + (tl.minimum(t0 + BT, eos) - 1).to(tl.int64) * H + i_h)
                b_g = tl.where(m_t, tl.load(g + rows * H + i_h, mask=m_t, other=0.0), b_glast)
            else:
                b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
                b_glast = tl.sum(tl.where(o_t == BT - 1, b_g, 0.0), axis=0)
            b_dq = b_dq * (tl.exp(b_g) * scale)[:, None]
            b_dk = b_dk * tl.exp(b_glast - b_g)[:, None]
            # d G_last through γ_C S and through the decayed keys of the state update
            if LEAN:  # one flat reduction (Triton 3.6, sm_90: 32 instructions and 4 barriers fewer than two)
                b_dglast = tl.sum(b_hdh, axis=0) * tl.exp(b_glast) + tl.sum(tl.reshape(b_dk * b_kf, [BT * BK]), axis=0)
            else:
                b_dglast = tl.sum(b_hdh, axis=0) * tl.exp(b_glast) + tl.sum(tl.sum(b_dk * b_kf, axis=1), axis=0)
            b_dP = b_dP * tl.exp(tl.where(m_i, b_g[:, None] - b_g[None, :], 0.0))
        else:
            b_dq = b_dq * scale
        b_dP = (tl.where(m_i, b_dP, 0.0) * scale).to(dt)
        b_dq += tl.dot(b_dP, b_k, input_precision="ieee")
        b_dk += tl.dot(tl.trans(b_dP), b_q, input_precision="ieee")
        if USE_DELTA and not LEAN:
            p_w = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
            tl.store(dw + p_w, (-b_dw).to(dw.dtype.element_ty), mask=m_k)
        if USE_G:
            b_dG = tl.sum(b_dq * b_qf, axis=1) - tl.sum(b_dk * b_kf, axis=1)
            i_last = tl.minimum(eos - t0, BT) - 1
            b_dG += tl.where(o_t == i_last, b_dglast, 0.0)
            tl.store(dG + i_k * NTOK * H + rows * H + i_h, b_dG, mask=m_t)
        b_dq_sum += b_dq
        b_dk_sum += b_dk
    tl.store(dq + p_qk, b_dq_sum.to(dq.dtype.element_ty), mask=m_k)
    tl.store(dk + p_qk, b_dk_sum.to(dk.dtype.element_ty), mask=m_k)


@triton.jit
def _bwd_dp_sum_kernel(
    q, k, vn, g, do, dPs, dG, cu_seqlens, chunk_indices, scale, T, NT, NTOK, SLOT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HB: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Gated linear attention (SSD) backward, intra-chunk half, per (chunk, block of ``HB`` value heads on one
    query/key head): the masked ``dP_h = scale·(dO_h V_hᵀ ⊙ Γ_h)`` (lower triangle with the diagonal) summed over
    the block into ``dPs[i_c, i_b]`` [BT, BT] float32, and each head's intra-chunk share of dG,
    ``rowsum − colsum`` of ``dP_h ⊙ Q Kᵀ``, into ``dG[SLOT]``. ``_bwd_dqkg_inter_kernel`` applies ``Σ dP``."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    NB: tl.constexpr = H // HB
    i_hk = (i_b * HB) // (H // HK)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    m_i = o_t[:, None] >= o_t[None, :]
    dt = q.dtype.element_ty
    p_qk = rows[:, None] * (HK * K) + i_hk * K

    b_qk = tl.zeros([BT, BT], dtype=tl.float32)  # [i, j] = q_i · k_j
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + p_qk + o_k[None, :], mask=m_k, other=0.0)
        b_k = tl.load(k + p_qk + o_k[None, :], mask=m_k, other=0.0)
        b_qk += tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    b_dPs = tl.zeros([BT, BT], dtype=tl.float32)
    p_g = g + rows * H + i_b * HB
    b_gn = tl.load(p_g, mask=m_t, other=0.0)  # the gate row a head ahead
    for i_j in range(HB):
        i_h = i_b * HB + i_j
        b_g = tl.cumsum(b_gn.to(tl.float32), axis=0)
        b_gn = tl.load(p_g + i_j + 1, mask=m_t & (i_j + 1 < HB), other=0.0)
        b_dP = tl.zeros([BT, BT], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = m_t[:, None] & (o_v < V)[None, :]
            p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
            b_v = tl.load(vn + p_v, mask=m_v, other=0.0).to(dt)
            b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(dt)
            b_dP += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dP = b_dP * tl.exp(tl.where(m_i, b_g[:, None] - b_g[None, :], 0.0))
        b_dP = tl.where(m_i, b_dP, 0.0) * scale
        b_dPs += b_dP
        b_pa = b_dP * b_qk
        tl.store(dG + SLOT * NTOK * H + rows * H + i_h, tl.sum(b_pa, axis=1) - tl.sum(b_pa, axis=0), mask=m_t)
    tl.store(dPs + (i_c.to(tl.int64) * NB + i_b) * BT * BT + o_t[:, None] * BT + o_t[None, :], b_dPs)


@triton.jit
def _bwd_dqkg_inter_kernel(
    q, k, vn, g, h, do, dh, dPs, dq, dk, dG, cu_seqlens, chunk_indices, scale, T, NT, NTOK,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HB: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Gated linear attention (SSD) backward, the rest of dq, dk and dG per (K tile, chunk, query/key head), after
    ``_bwd_dp_sum_kernel``: ``dq = Σ_h diag(scale·γ) dO_h S_hᵀ + (Σ dP) K`` and ``dk = Σ_h diag(γ_C/γ) V_h dS_hᵀ +
    (Σ dP)ᵀ Q`` over the value heads of the group, and this K tile's share of each head's inter-chunk dG terms
    (``rowsum(dq_h ⊙ Q) − rowsum(dk_h ⊙ K)``, and ``dG_last``) into ``dG[i_k]``. Without the intra-chunk dP
    inside the head loop, and with q and k held in the input dtype (widened where the dG terms use them), the loop
    keeps two [BT, BK] float32 sums and the head's two products live."""
    i_k, i_c, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NG: tl.constexpr = H // HK
    NB: tl.constexpr = H // HB
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = m_t[:, None] & (o_k < K)[None, :]
    dt = q.dtype.element_ty
    p_qk = rows[:, None] * (HK * K) + i_hk * K + o_k[None, :]
    i_last = tl.minimum(eos - t0, BT) - 1

    b_q = tl.load(q + p_qk, mask=m_k, other=0.0)
    b_k = tl.load(k + p_qk, mask=m_k, other=0.0)
    b_dq_sum = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk_sum = tl.zeros([BT, BK], dtype=tl.float32)
    p_g = g + rows * H + i_hk * NG
    b_gn = tl.load(p_g, mask=m_t, other=0.0)  # the gate row a head ahead (not pipelined by the compiler)
    for i_g in range(NG):
        i_h = i_hk * NG + i_g
        b_g = tl.cumsum(b_gn.to(tl.float32), axis=0)
        b_gn = tl.load(p_g + i_g + 1, mask=m_t & (i_g + 1 < NG), other=0.0)
        p_s = (i_c.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_hdh = tl.zeros([1], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
            m_v = m_t[:, None] & (o_v < V)[None, :]
            p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
            b_h = tl.load(h + p_s + o_v[None, :], mask=m_kv, other=0.0)
            b_dh = tl.load(dh + p_s + o_v[None, :], mask=m_kv, other=0.0)
            b_v = tl.load(vn + p_v, mask=m_v, other=0.0).to(dt)
            b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(dt)
            b_dq += tl.dot(b_do, tl.trans(b_h), input_precision="ieee")
            b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision="ieee")
            b_hdh += tl.sum(tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1), axis=0)
        b_glast = tl.sum(tl.where(o_t == BT - 1, b_g, 0.0), axis=0)
        b_dq = b_dq * (tl.exp(b_g) * scale)[:, None]
        b_dk = b_dk * tl.exp(b_glast - b_g)[:, None]
        b_dkk = tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        b_dG = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - b_dkk
        # d G_last through γ_C S and through the decayed keys of the state update
        b_dglast = tl.sum(b_hdh, axis=0) * tl.exp(b_glast) + tl.sum(b_dkk, axis=0)
        b_dG += tl.where(o_t == i_last, b_dglast, 0.0)
        tl.store(dG + i_k * NTOK * H + rows * H + i_h, b_dG, mask=m_t)
        b_dq_sum += b_dq
        b_dk_sum += b_dk
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    p_p = dPs + (i_c.to(tl.int64) * NB + i_hk * (NG // HB)) * BT * BT + o_t[:, None] * BT + o_t[None, :]
    for i_b in range(NG // HB):
        b_dP += tl.load(p_p + i_b * BT * BT)
    b_dP = b_dP.to(dt)
    b_dq_sum += tl.dot(b_dP, b_k, input_precision="ieee")
    b_dk_sum += tl.dot(tl.trans(b_dP), b_q, input_precision="ieee")
    tl.store(dq + p_qk, b_dq_sum.to(dq.dtype.element_ty), mask=m_k)
    tl.store(dk + p_qk, b_dk_sum.to(dk.dtype.element_ty), mask=m_k)


@triton.jit
def _wy_bwd_kernel(
    k, v, beta, g, Tm, dvn, dw, dk_part, dk, dv, dbeta, dG, cu_seqlens, chunk_indices, T, NT, NTOK, SLOT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
    G_CUM: tl.constexpr = False,
):  # fmt: skip
    """Backward of ``U = T diag(β) V``, ``W = T diag(βγ) K``, ``T = (I + A)⁻¹`` per (chunk, head):
    writes ``dv``, ``dbeta``, ``dG[SLOT]`` and the final ``dk = dk_part + WY terms`` (H == HK)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HK)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    rows = (t0 + o_t).to(tl.int64)
    dt = k.dtype.element_ty
    p_k = k + rows[:, None] * (HK * K) + i_hk * K

    b_T = tl.load(Tm + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_Tt = tl.trans(b_T).to(dt)
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if USE_G:
        if G_CUM:  # g holds G, as in _bwd_dqkwg_kernel
            b_glast = tl.load(g + (tl.minimum(t0 + BT, eos) - 1).to(tl.int64) * H + i_h)
            b_g = tl.where(m_t, tl.load(g + rows * H + i_h, mask=m_t, other=0.0), b_glast)
        else:
            b_g = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32), axis=0)
        b_gam = tl.exp(b_g)
    else:
        b_gam = tl.full([BT], 1.0, dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dG = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = m_t[:, None] & (o_v < V)[None, :]
        p_v = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_du = tl.load(dvn + p_v, mask=m_v, other=0.0).to(dt)
        b_dT += tl.dot(b_du, tl.trans((b_v * b_beta[:, None]).to(dt)), input_precision="ieee")
        b_tdu = tl.dot(b_Tt, b_du, input_precision="ieee")
        tl.store(dv + p_v, (b_tdu * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_v)
        b_db += tl.sum(b_tdu * b_v, axis=1)
    b_bg = b_beta * b_gam
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(p_k + o_k[None, :], mask=m_k, other=0.0)
        b_kf = b_k.to(tl.float32)
        b_dw = tl.load(dw + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_k, other=0.0).to(dt)
        b_dT += tl.dot(b_dw, tl.trans((b_kf * b_bg[:, None]).to(dt)), input_precision="ieee")
    m_s = o_t[:, None] > o_t[None, :]
    b_dA = tl.dot(tl.dot(b_Tt, b_dT.to(dt), input_precision="ieee").to(dt), b_Tt, input_precision="ieee")
    b_dA = tl.where(m_s, -b_dA, 0.0)
    if USE_G:
        b_dM = b_dA * tl.exp(tl.where(m_s, b_g[:, None] - b_g[None, :], 0.0))
    else:
        b_dM = b_dA
    # Through A = β ⊙ (K Kᵀ) ⊙ Γ: dβ_t += Σ_s dM_ts k_t·k_s = k_t·(dM K)_t and, for dG, the row and column
    # sums of dM ⊙ A = k_t·β_t(dM K)_t and k_s·(dMᵀ diag(β) K)_s. Both products also give dk, so the
    # reductions reuse them; likewise dβ/dG's Tᵀ dW terms. (A separate K Kᵀ tile measured 2e-2 to 5e-2
    # relative dbeta error on the H100 in bf16: benchmarks/NOTES-kernels.md, v3.)
    b_dMc = b_dM.to(dt)
    b_dMt = tl.trans(b_dM).to(dt)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = m_t[:, None] & (o_k < K)[None, :]
        p_d = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_k = tl.load(p_k + o_k[None, :], mask=m_k, other=0.0)
        b_kf = b_k.to(tl.float32)
        b_kb = (b_kf * b_beta[:, None]).to(dt)
        b_dw = tl.load(dw + p_d, mask=m_k, other=0.0).to(dt)
        b_dk = tl.load(dk_part + p_d, mask=m_k, other=0.0).to(tl.float32)
        b_tdw = tl.dot(b_Tt, b_dw, input_precision="ieee")  # Tᵀ dW
        b_dk += b_tdw * b_bg[:, None]
        b_tk = tl.sum(b_tdw * b_kf, axis=1)
        b_db += b_tk * b_gam
        b_dG += b_tk * b_bg
        b_mk = tl.dot(b_dMc, b_k, input_precision="ieee")  # dM K
        b_kmk = tl.sum(b_mk * b_kf, axis=1)
        b_db += b_kmk
        if USE_G:
            b_dG += b_kmk * b_beta
        b_dk += b_mk * b_beta[:, None]
        b_mtk = tl.dot(b_dMt, b_kb, input_precision="ieee")  # dMᵀ diag(β) K
        if USE_G:
            b_dG -= tl.sum(b_mtk * b_kf, axis=1)
        b_dk += b_mtk
        tl.store(dk + p_d, b_dk.to(dk.dtype.element_ty), mask=m_k)
    tl.store(dbeta + rows * H + i_h, b_db, mask=m_t)
    if USE_G:
        tl.store(dG + SLOT * NTOK * H + rows * H + i_h, b_dG, mask=m_t)


@triton.jit
def _dg_finalize_kernel(
    dG, dg, cu_seqlens, chunk_indices, T, NT, NTOK,
    NS: tl.constexpr, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, IS_VARLEN: tl.constexpr,
    REVERSE: tl.constexpr = True,
):  # fmt: skip
    """``dg = reverse_cumsum(Σ_slots dG)`` inside each chunk, per (chunk, block of ``BH`` heads): a
    ``[BT, BH]`` tile whose rows are contiguous along the heads. ``REVERSE`` False: the forward cumsum (with one
    slot: the gate's cumulative sum ``G`` inside each chunk, see :func:`_chunk_gate_cumsum`)."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n * T
        eos = bos + T
    t0 = bos + i_t * BT
    o_t = tl.arange(0, BT)
    o_h = i_b * BH + tl.arange(0, BH)
    m = ((t0 + o_t) < eos)[:, None] & (o_h < H)[None, :]
    p = (t0 + o_t).to(tl.int64)[:, None] * H + o_h[None, :]
    b = tl.zeros([BT, BH], dtype=tl.float32)
    for s in range(NS):
        b += tl.load(dG + s * NTOK * H + p, mask=m, other=0.0)
    b = tl.cumsum(b, axis=0, reverse=REVERSE)
    tl.store(dg + p, b.to(dg.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

#: Launch settings per kernel: tile caps (BK, BV: the largest tile along K / V; sequential kernels
#: always take the whole K), num_warps and num_stages. Chosen from the sm_90 compiler's register
#: report at K = V = 128 (no spills) and the H100 variants in benchmarks/NOTES-kernels.md.
#: ``MIXLAB_TRITON_CHUNK_CONFIG`` (JSON, same keys) overrides entries for tuning runs, e.g.
#: ``{"fwd_h": {"num_warps": 8}}``. ``wy_bwd``: tiles of 64 at K ≤ 128 (H100: GDN 8.62 vs 9.06 ms with
#: 32, despite a 68-byte spill in the ungated kernel), 32 above (``small_above``: spill-free at K = 256,
#: V = 512). ``dqkwg`` dk_part_f32 0:
#: the dk partial in the input dtype (H100: −0.15 ms, bf16 dk error 6.2 → 6.4e-3). From the v4 variants
#: (H100, T=2K, per-kernel profile): ``_wy_bwd_kernel`` takes dβ/dG's Tᵀ dW terms from the dk loop's
#: product (GDN 1.72 → 1.64 ms, DN 1.55 → 1.44 against a second product), ``dqkwg``
#: BV 32 for the ungated kernel only (DN 1.39 → 1.29; GDN 2.00 → 2.17 so it keeps 64), ``dqkwg_ssd`` BV 32
#: (4.44 → 4.05); the kkt_solve row_regs / split variants and BV 16 for the sequential kernels were slower.
CONFIG: dict[str, dict[str, int]] = {
    # row_regs 1: the forward substitution reads rows from registers, not from L2; split 1: A = K Kᵀ… and the
    # solve as two launches (kkt_warps, solve_warps), see _kkt_solve_kernel. sm_90, K = 128, Triton 3.9: one
    # launch spills 92 bytes at 2 warps (255 registers), none at 4 (210)
    "kkt_solve": {
        "BK": 64,
        "BV": 64,
        "num_warps": 2,
        "num_stages": 2,
        "row_regs": 0,
        "split": 0,
        "kkt_warps": 4,
        "solve_warps": 1,
    },
    "wu_fwd": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3},
    # Any entry may take K-dependent launch keys BK_k256, BV_k256, num_warps_k256,
    # num_stages_k256 (used when K > 128, replacing the built-in K > 128 rules of _launch). Measured at the 1.3b
    # Gated DeltaNet shape (H6 K256 V512, B8 T4096, H100, per-kernel profile of one fwd+bwd): the sequential
    # kernels at BV 64 (8 warps) instead of 32: fwd_h 1.23 -> 0.73 ms, bwd_dh 1.72 -> 1.13 ms, although
    # Triton 3.9's ptxas reports more spills there; wy_bwd at 32 x 64 tiles 0.96 -> 0.81 ms
    # BV_wide: 64 value columns per program while that leaves >= wide_min_programs programs (about two waves of
    # 132 SMs). H100, 65,536 tokens, forward+backward (results/kernels-...-s3-wide*.json): GDN H16 K128 V128
    # 8.15 -> 7.89 ms at T = 2K, 4K, 8K (1,024 / 512 / 256 programs), DN 7.21 -> 7.05, SSD H64 (V = 64) 11.18 -> 10.97
    # at 2K and 11.67 -> 11.38 at 16K; at 16K GDN/DN (128 programs) level, at 32K (64) BV 64 ran 9.95 against 9.31
    # BV_narrow: 16 value columns while the 32-column tile would give at most narrow_max_programs programs (few long
    # sequences). H100, 65,536 tokens, T = 32K (results/kernels-narrow-…-2026-11-25-s13.json): DeltaNet H16 K128 fwd_h
    # 0.991 -> 0.862 ms (fwd+bwd 7.27 -> 7.14), GDN level (1.034 / 1.041); fwd_ho and bwd_dh at 16 were slower
    # seg_state_elems / seg_min_chunks / seg_max_k: see recompute_segment_chunks. H100, 65,536 tokens, fwd+bwd ms,
    # unsegmented -> 2M (results/kernels-segments-…-2026-11-25-s14.json): T = 32K GDN 8.89 -> 8.50, DeltaNet 7.16 ->
    # 6.90, SSD 7.49 -> 7.37 (the recompute 1.05 -> 0.58, 0.86 -> 0.59, 1.13 -> 0.93 ms; SSD's stores cost its fused
    # forward 0.05); T = 16K GDN 7.28 -> 7.18, DeltaNet 6.12 -> 6.03, SSD (2M values: unsegmented) 5.87, at 4M 5.98.
    # At K 256 (1.3b GDN shape, 32,768 tokens, T = 16K) 6.68 -> 6.96: the unfused forward's fwd_h spills with the
    # stores (+0.25 ms) and the recompute gained nothing, so K > 128 stays unsegmented
    "fwd_h": {
        "seg_state_elems": 1 << 21,
        "seg_min_chunks": 16,
        "seg_max_k": 128,
        "BV_narrow": 16,
        "narrow_max_programs": 128,
        "BV": 32,
        "num_warps": 4,
        "num_stages": 2,
        "BV_k256": 64,
        "BV_wide": 64,
        "wide_min_programs": 256,
    },
    # BV_k256 128: at the 1.3b GDN shape (K 256, V 512) q and k are re-read by half as many V tiles; H100 fwd+bwd
    # 6.25 -> 5.96 ms per layer call (results/kernels-gdn-1.3b-shape-...-2026-11-24-s4-variants.json)
    "fwd_o": {"BK": 128, "BV": 64, "num_warps": 4, "num_stages": 3, "BV_k256": 128},
    # enable 1: a forward that does not keep its states runs _fwd_ho_kernel (state pass and output in one
    # sequential kernel, no h / V_new written or read) instead of _fwd_h_kernel + _fwd_o_kernel, for K <= max_k.
    # H100, 65,536 tokens, T = 2K, forward ms (fwd_h + fwd_o -> fused; results/kernels-...-2026-11-24-s4-fused.json):
    # GDN 2.41 -> 2.25, DN 2.32 -> 1.86, SSD 2.66 -> 1.52 at 4 warps (8 warps: 2.52 / 2.10 / 2.45); at K = 256
    # (1.3b GDN shape, 8 warps, BV 32: 2.20 ms vs 0.73 + 0.91) the q / k / w tiles take ~210 KB of shared
    # memory (one program per SM), so it stays off there
    # prefetch_v (prefetch_v_xd for SSD's scaled values): load the v / x tile a chunk ahead (PREFETCH_V). H100,
    # 65,536 tokens, T = 2K (results/kernels-ssd-split-dqkg-…-s13.json): the kernel DeltaNet 0.699 -> 0.521 ms, GDN
    # H16 K128 1.049 -> 0.936; SSD 1.100 -> 1.168 (255 registers: the held tile spills), so off there. The same
    # in _fwd_h_kernel was level or slower (GDN 0.573 -> 0.634) and is not there
    # num_stages_one_wave (the delta rule; bwd_dh: num_stages_one_wave_ungated, DeltaNet only): the pipeline depth
    # when the launch fits one wave (at most one program an SM: two sequences of 32K at H16), where nothing else on
    # the SM hides a chunk's load latency. H100, 65,536 tokens, per call (results/kernels-stages-…-2026-11-25-s14.json):
    # at T = 32K (128 programs) 2 -> 3 stages fwd_ho GDN 1.740 -> 1.490 ms, DeltaNet 1.104 -> 0.736, bwd_dh DeltaNet
    # 1.299 -> 0.916 (GDN 1.354 -> 1.522: kept at 2); at 2K (1,024) slower: fwd_ho GDN 0.870 -> 1.411, DeltaNet
    # 0.522 -> 0.575, bwd_dh DeltaNet 0.831 -> 0.935; at 16K (256) GDN fwd+bwd 7.18 -> 7.67. SSD's fused forward at 3
    # stages: 1.87 -> 2.77 at 32K.
    # prefetch_g / prefetch_g_xd (SSD) here, prefetch_g / prefetch_g_gla (SSD) in bwd_dh: the gate row loaded a chunk
    # ahead (PREFETCH_G). H100, 65,536 tokens, per call (results/kernels-prefetch-g-…-2026-11-25-s14.json): fwd_ho GDN
    # 0.878 -> 0.840 ms at 2K (32K level), SSD 1.135 -> 1.103 (2K), 1.887 -> 1.776 (32K); bwd_dh GDN 1.327 -> 1.247 at
    # 32K (2K level), SSD 1.322 -> 1.518 at 2K, so off there; at K 256 (1.3b GDN shape, 32,768 tokens, T = 8K) 1.471 ->
    # 1.492, fwd+bwd 6.73 -> 6.77 (results/kernels-prefetch-g-k256-…-s14.json), so off there too (prefetch_g_k256).
    # g_cumsum (also in dqkwg, wy_bwd; g_cumsum_gla: gated linear attention, SSD): the kernel reads the gate's
    # per-chunk cumulative sum G, formed once by _chunk_gate_cumsum (0.004 ms), instead of scanning g and reducing for
    # G's last value in every chunk (G_CUM). H100, 65,536 tokens (results/kernels-g-cumsum-…-s14.json), per call:
    # GDN fwd_ho 0.850 -> 0.714 ms (2K), 1.503 -> 1.233 (32K), the GDN fwd+bwd 7.08 -> 6.91 (2K), 8.19 -> 7.93 (32K)
    # (call 11); then in one later call dqkwg 1.582 -> 1.511, wy_bwd 1.641 -> 1.519 (2K), fwd+bwd 6.88 -> 6.70 (2K),
    # 7.88 -> 7.70 (32K) (call 15). SSD's fused forward lost (1.104 -> 1.211 ms at 2K). The same in the recompute
    # fwd_h (0.572 -> 0.573) and the reverse pass bwd_dh (1.260 -> 1.376 at 32K) was level or slower and is not there
    "fwd_ho": {
        "num_stages_one_wave": 3,
        "g_cumsum": 1,
        "g_cumsum_gla": 0,
        "prefetch_g": 1,
        "prefetch_g_xd": 1,
        "prefetch_v": 1,
        "prefetch_v_xd": 0,
        "enable": 1,
        "max_k": 128,
        "BV": 32,
        "num_warps": 4,
        "num_stages": 2,
        "BV_wide": 64,
        "wide_min_programs": 256,
    },
    # Runs only where bwd_dh does not form the intra-chunk dV itself (fold_dv: K > 128, or the gated delta rule
    # with few sequences × heads). heads: value heads per program that share one Q Kᵀ tile (SSD's groups; the
    # delta rule has one per program).
    # H100, SSD H64 P64 N128 (64 heads on one group), 65,536 tokens, T = 2K, fwd+bwd
    # (results/kernels-ssd-variants-a-…-s10.json): heads 1 8.31 ms, 4 7.65, 16 7.51 (the kernel 1.28 -> 0.48 ms),
    # 64 7.50; 8 warps or 2 stages slower
    "dv_local": {"BK": 128, "BV": 64, "num_warps": 4, "num_stages": 3, "heads": 16},
    # BV_gla: the V tile without the delta rule (SSD) at K <= 128 while sequences × heads >= gla_min_programs.
    # H100, SSD H64 P64 N128, with dqkwg_ssd BV 64 (results/kernels-ssd-variants-b-…-s10.json and
    # kernels-ssd-bwd-dh-bv-…-s10.json): 1.53 -> 1.22 ms per call at 65,536 tokens, T = 2K (8 warps 1.71); fwd+bwd
    # with BV 64 / 32: 65,536 tokens 6.77 / 7.09 ms (2K), 8.16 / 8.28 (32K, 128 sequence-heads); 32,768 tokens
    # 3.48 / 3.84 (8K), 5.90 / 5.81 (32K, 64 sequence-heads). GDN / DN stay at 32 (BV 64: GDN 7.45 -> 7.59 ms
    # fwd+bwd at 16K).
    # fold_dv 1: the intra-chunk dV is formed inside this pass (LOCAL_DV) instead of by _bwd_dv_local_kernel, at
    # K <= fold_max_k and, for the gated delta rule, from fold_gated_delta_min_seq_heads sequences × heads on.
    # H100, 65,536 tokens, fwd+bwd without / with (results/kernels-fold-dv-…-s10.json): SSD H64 P64 N128 6.75 / 6.37
    # ms (2K), 6.76 / 6.47 (8K), 8.10 / 8.10 (32K); DeltaNet H16 K128 V128 6.55 / 5.99 (2K), 7.86 / 7.27 (32K); GDN
    # 7.31 / 7.21 (4K), 7.42 / 7.30 (16K, 64 sequence-heads), 8.89 / 9.12 (32K, 32); at K 256 V 512 (the 1.3b GDN
    # shape, H6, 32,768 tokens, T 4K) GDN 5.91 / 7.37, DeltaNet 5.66 / 6.09
    "bwd_dh": {
        "BV": 32,
        "num_warps": 4,
        "num_stages": 2,
        "BV_k256": 64,
        "BV_gla": 64,
        "gla_min_programs": 128,
        "fold_dv": 1,
        "fold_max_k": 128,
        "fold_gated_delta_min_seq_heads": 64,
        "num_stages_one_wave_ungated": 3,
        "prefetch_g": 1,
        "prefetch_g_gla": 0,
        "prefetch_g_k256": 0,
    },
    # lean 1 / maxnreg N (gated launch only, also in dqkwg_ssd): see _bwd_dqkwg_kernel's LEAN. sm_90 cross-compile
    # (pointer args 16-aligned, as launched), GDN K = V = 128, BK 64, 8 warps; registers / spill bytes / SASS
    # instructions with Triton 3.6 (registers with 3.9): BV 64 3 stages 161 / 0 / 1336 (153), BV 32 154 / 0 / 1480
    # (154): one 8-warp CTA per SM either way (the ungated kernel: 92, two); lean BV 32 128 / 0 / 1528 (138; 128 and
    # no spill with maxnreg 128), lean BV 64 2 stages maxnreg 128: 128 / 0 / 1328 (128 / 0), 82 KB shared memory:
    # both two CTAs per SM. H100, 65,536 tokens, GDN H16 K128 V128 fwd+bwd (results/kernels-...-2026-11-24-s4-dqkwg.json):
    # 7.74 -> 7.34 ms at T = 2K and 8K with lean, 2 stages (num_stages_lean), maxnreg 128; lean BV 32 7.52, lean alone
    # 7.76. DeltaNet keeps 3 stages (6.59 ms; 2 stages: 6.85). 1.3b shape (K 256, V 512): level (6.24 vs 6.25 ms)
    "dqkwg": {
        "BK": 64,
        "BV": 64,
        "num_warps": 8,
        "num_stages": 3,
        "dk_part_f32": 0,
        "BV_ungated": 32,
        "lean": 1,
        "maxnreg": 128,
        "num_stages_lean": 2,
        "g_cumsum": 1,
    },
    # gated linear attention (SSD, no delta rule), the one-kernel form (split 0). H100, SSD H64 P64 N128, 65,536 tokens,
    # T = 2K
    # (results/kernels-...-2026-11-24-s4-dqkwg-ssd*.json): 4 warps 4.02 -> 2.65 ms per call (fwd+bwd 9.76 -> 8.38);
    # BK 128 at 8 warps 2.65 too, at 4 warps 6.97; 2 warps 8.00; dP summed over a group's heads in the kernel
    # (sum_dp, removed in session 13 for the split) 4.08; BV 64 4.41; 2 stages 4.52.
    # Session 10 (results/kernels-ssd-variants-{a,b}-…-s10.json, the kernels of then): BV 64 2.67 -> 2.33 ms per
    # call (V = 64 is one tile, so the per-head loop is the innermost, pipelined one); at BV 64: 8 warps 4.51,
    # 2 stages 2.53, lean 2.81, lean at 8 warps 5.01, BK 128 at 8 warps 7.40
    # split 1 (session 13): two kernels instead of _bwd_dqkwg_kernel, _bwd_dp_sum_kernel (the intra-chunk dP summed
    # over a block of heads, and the intra-chunk dG) then _bwd_dqkg_inter_kernel (the states' part, plus Σ dP applied
    # once). H100, SSD H64 P64 N128, 65,536 tokens, T = 2K, per call
    # (results/kernels-ssd-split-dqkg-…-s13.json): one kernel 2.35 ms; split 1.24 + 0.52 ms (the inter kernel took
    # 1.91 ms until it loaded the gate row a head ahead: Triton 3.6 did not pipeline that load); SSD fwd+bwd in one
    # call 6.32 -> 5.86 ms (2K), 6.37 -> 5.87 (8K), 5.75-5.77 / 5.80-5.81 at the final dp_sum launch in later calls; inter at
    # 8 warps 1.82, 2 stages 1.46, 4 stages 1.81
    "dqkwg_ssd": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3, "split": 1},
    # heads: value heads per program (one [BT, BT] block of Σ dP written per program, the inter kernel adds a group's
    # blocks). maxnreg 168 (three 4-warp blocks per SM instead of two at 192 registers; at 168 the sm_90 ptxas of
    # Triton 3.6 spills nothing, that of 3.9 28 bytes, results/sm90-registers-ssd-split-…-s13.json):
    # 0.834 -> 0.595 ms, 3 stages 0.514-0.519; 8 warps at maxnreg 128 0.62-0.72; heads 32 / 64 within 1%
    "dp_sum": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3, "heads": 16, "maxnreg": 168},
    "wy_bwd": {
        "BK": 64,
        "BV": 64,
        "num_warps": 8,
        "num_stages": 3,
        "small_above": 128,
        "BK_k256": 32,
        "BV_k256": 64,
        "g_cumsum": 1,
    },
    # heads: heads per program (a [64, heads] tile). H100, SSD H64, 65,536 tokens: one head per program at one warp
    # 0.145 ms per call (results/kernels-ssd-variants-a-…-s10.json), 64 heads at 4 warps 0.021
    # (kernels-new-…-s10.json)
    "dg_finalize": {"heads": 64},
    # save 1: the delta rule's forward keeps the chunk states h and V_new for the backward instead of the
    # backward recomputing them (one sequential pass less; h and V_new in the input dtype stay allocated
    # between forward and backward: ((T/64)·K + 1)·V values per token-head beyond v)
    "bwd_h": {"save": 0},
    # materialize 1: let autograd fill zero gradients for the custom op's unused outputs (the old behaviour)
    "autograd": {"materialize": 0},
    # the fewest stages _fit retries a sequential kernel at when its tiles exceed shared memory (16-bit / float32).
    # H100, Triton 3.6, float32 (results/gpu-checks-…-s11.json): at K = 256 bwd_dh needs 328 KB at 2 stages and runs at
    # 1, within 6e-7 of float64 at K 256 V 512, K 192 V 256, K 256 V 128 (gated delta rule) and SSD N 256
    "stage_fit": {"seq_floor": 2, "seq_floor_fp32": 1},
}
if os.environ.get("MIXLAB_TRITON_CHUNK_CONFIG"):
    for _name, _cfg in json.loads(os.environ["MIXLAB_TRITON_CHUNK_CONFIG"]).items():
        CONFIG[_name] = {**CONFIG[_name], **_cfg}
    # some entries (fwd_h's seg_*) decide the shapes of the custom ops' outputs, which torch.compile takes from
    # the fake implementations at trace time: a graph that inductor cached under other settings would not fit, so
    # each override compiles into a subdirectory of its own (importing torch's inductor has usually set the root)
    _sub = "mixlab-config-" + hashlib.sha1(os.environ["MIXLAB_TRITON_CHUNK_CONFIG"].encode()).hexdigest()[:12]
    _root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "torchinductor-mixlab")
    if os.path.basename(_root) != _sub:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_root, _sub)


def _heads_per_block(group: int, cap: int) -> int:
    """The largest power of two that divides ``group`` (value heads per query/key head) and is ≤ ``cap``."""
    hb = 1
    while hb * 2 <= cap and group % (hb * 2) == 0:
        hb *= 2
    return hb


def _np2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _launch(
    name: str, K: int, V: int, seq: bool = False, seq_heads: int | None = None
) -> tuple[int, int, dict[str, int]]:
    """(BK, BV, launch kwargs) of kernel ``name`` for head dims K, V; ``seq_heads`` (sequences × heads) lets a
    sequential kernel take its wider ``BV_wide`` value tile when that still gives ``wide_min_programs`` programs, or
    its narrower ``BV_narrow`` one when its tile gives at most ``narrow_max_programs``."""
    cfg = CONFIG[name]
    BK = _np2(K) if seq else min(cfg["BK"], _np2(K))
    BV = min(cfg["BV"], _np2(V))
    wide = cfg.get("BV_wide")
    if wide and seq_heads is not None and seq_heads * triton.cdiv(V, wide) >= cfg.get("wide_min_programs", 0):
        BV = min(wide, _np2(V))
    narrow = cfg.get("BV_narrow")
    if narrow and seq_heads is not None and seq_heads * triton.cdiv(V, BV) <= cfg.get("narrow_max_programs", 0):
        BV = min(narrow, _np2(V))
    nw, ns = cfg["num_warps"], cfg["num_stages"]
    if seq and BK > 128:  # keep the float32 state tile [K, BV] within the register file
        BV, nw = min(BV, 32), max(nw, 8)
    if cfg.get("small_above", 1 << 30) < K:
        BK, BV = min(BK, 32), min(BV, 32)
    if K > 128:  # K-dependent entries (``BK_k256`` …): given ones replace the two rules above
        if not seq:
            BK = min(cfg.get("BK_k256", BK), _np2(K))
        BV = min(cfg.get("BV_k256", BV), _np2(V))
        nw, ns = cfg.get("num_warps_k256", nw), cfg.get("num_stages_k256", ns)
    if seq and ns < 2:
        # Triton 3.6, H100: fwd_h at one stage (K = 256: BK 256, BV 64, 8 warps) hit an illegal memory access in
        # the backward's recompute. The kernels' addresses stay in bounds at these tiles (test_k256_tiles_in_bounds),
        # so it is a code-generation fault; one stage would only drop the g row's prefetch.
        if (name, ns) not in _CLAMPED:
            _CLAMPED.add((name, ns))
            msg = f"chunk {name}: num_stages {ns} raised to 2 (sequential kernels fault at 1 stage on sm_90)"
            warnings.warn(msg, stacklevel=3)
        ns = 2
    return BK, BV, {"num_warps": nw, "num_stages": ns}


_CLAMPED: set[tuple[str, int]] = set()  # (kernel, num_stages) pairs already warned about


class _StageFit:
    """``_fit(kernel)[grid](...)``: launch ``kernel``; when its pipelined tiles do not fit shared memory (float32
    inputs at K = 256 on sm_90: ``fwd_o`` asks 256 KB of 227), launch again with one stage less, down to
    ``floor``, and keep the stages that fit for the next launch of that kernel with those launch arguments. Below
    the floor it raises a RuntimeError that names the head dims, the dtype and the way out. H100, Triton 3.6,
    float32 at K = 256: ``fwd_o`` runs at 2 stages, ``bwd_dh`` at 1 (328 KB at 2)."""

    def __init__(self, kernel, floor: int):
        self.kernel, self.floor = kernel, floor

    def __getitem__(self, grid):
        def launch(*args, **kw):
            def signature():
                ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
                return id(self.kernel), ref.dtype if ref is not None else None, tuple(sorted(kw.items()))

            ns, key = kw.get("num_stages", 3), None
            if _STAGES_FITTED:  # else nothing has needed fewer stages: no signature to build
                key = signature()
                ns = _STAGES_FITTED.get(key, ns)
            while True:
                try:
                    return self.kernel[grid](*args, **{**kw, "num_stages": ns})
                except OutOfResources as err:
                    name = getattr(self.kernel, "__name__", None) or getattr(self.kernel.fn, "__name__", "?")
                    if ns <= self.floor:
                        dtype = signature()[1]
                        raise RuntimeError(
                            f"chunk kernel {name}: its tiles at K={kw.get('K')}, V={kw.get('V')} in {dtype} do not "
                            f"fit this device's shared memory even at {ns} pipeline stages ({err}). Run these head dims "
                            "in bf16/fp16 (e.g. under autocast) or on backend='chunked'"
                        ) from err
                    ns -= 1
                    key = key or signature()
                    if key not in _STAGES_FITTED:
                        warnings.warn(f"chunk kernel {name}: shared memory exceeded, retrying at num_stages {ns}",
                                      stacklevel=2)  # fmt: skip
                    _STAGES_FITTED[key] = ns

        return launch


_STAGES_FITTED: dict[tuple, int] = {}


def _fit(kernel, floor: int = 1) -> _StageFit:
    """See :class:`_StageFit`; the sequential kernels take :func:`_seq_floor`."""
    return _StageFit(kernel, floor)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (0 elsewhere: the one-wave launch rules never apply)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _one_wave(programs: int, device: torch.device) -> bool:
    """Whether a launch of ``programs`` programs fits one wave (one program an SM at most): few long sequences."""
    return programs <= _sm_count(device)


def _seq_floor(t: torch.Tensor) -> int:
    """The fewest pipeline stages a sequential kernel may be retried at for inputs like ``t``
    (``CONFIG["stage_fit"]``): 2 for 16-bit inputs (one stage faulted at K = 256 in bf16, see _launch), 1 for
    float32 (checked against float64 on the H100 at K = 256)."""
    return CONFIG["stage_fit"]["seq_floor_fp32" if t.element_size() == 4 else "seq_floor"]


class _Layout:
    """Chunk bookkeeping for a packed batch: ``B·T`` tokens, N sequences, NC chunks in total."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device):
        self.is_varlen = cu_seqlens is not None
        self.ntok = B * T
        if cu_seqlens is None:
            self.T, self.N = T, B
            self.NT = triton.cdiv(T, BT)
            self.NC = B * self.NT
            self.cu_seqlens = self.chunk_indices = self.chunk_offsets = torch.empty(1, dtype=torch.int32, device=device)
        else:
            bounds = [int(x) for x in cu_seqlens.tolist()]
            lens = [b - a for a, b in itertools.pairwise(bounds)]
            if any(n < 0 for n in lens):
                raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
            counts = [triton.cdiv(n, BT) for n in lens]
            self.T, self.N, self.NT = T, len(lens), 0
            self.NC = sum(counts)
            idx = [(n, i) for n, c in enumerate(counts) for i in range(c)]
            self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
            self.chunk_indices = torch.tensor(idx or [(0, 0)], dtype=torch.int32, device=device).reshape(-1)
            self.chunk_offsets = torch.tensor(
                list(itertools.accumulate(counts, initial=0)), dtype=torch.int32, device=device
            )

    def segments(self, seg: int) -> tuple[int, int]:
        """Segments of ``seg`` chunks (equal-length sequences): ``(per sequence, in all)``."""
        per = triton.cdiv(self.NT, seg)
        return per, self.N * per


def recompute_segment_chunks(lay: _Layout, H: int, K: int, V: int) -> int:
    """Chunks per segment of the backward's state recompute, 0 for none (``CONFIG["fwd_h"]``: ``seg_state_elems``,
    ``seg_min_chunks``). With few sequences × heads the sequential state kernel has too little work in parallel
    (its state tiles, ``N·H·K·V`` values) to fill the GPU; the forward then also stores the float32 state entering
    every segment (``SAVE_SEG``: one ``[K, V]`` state per head and segment), and the recompute runs each sequence's
    segments in parallel from them (``FROM_SEG``). Sequences are split into the fewest segments (a power of two)
    that give ``seg_state_elems`` state values in parallel, each of at least ``seg_min_chunks`` chunks, for
    K ≤ ``seg_max_k``. Packed batches (``cu_seqlens``) run unsegmented: their segment count would depend on the
    lengths, which ``torch.compile``'s fake tensors cannot know. Forward and backward derive it from the same
    layout. The segments change the forward's outputs (``hs``), so a compiled graph cached under other
    ``CONFIG["fwd_h"]`` settings does not fit: overrides through ``MIXLAB_TRITON_CHUNK_CONFIG`` get their own
    inductor cache directory."""
    cfg = CONFIG["fwd_h"]
    target, min_chunks = cfg.get("seg_state_elems", 0), max(1, cfg.get("seg_min_chunks", 1))
    if lay.is_varlen or cfg.get("seg_max_k", 0) < K:
        return 0
    n = 1
    while lay.N * H * K * V * n < target and 2 * n * min_chunks <= lay.NT:
        n *= 2
    return triton.cdiv(lay.NT, n) if n > 1 else 0


def segment_states_shape(B: int, T: int, H: int, K: int, V: int, packed: bool, keep: bool = False) -> tuple[int, ...]:
    """Shape of the forward's segment states ``hs`` for ``[B, T]`` tokens of H value heads (``(0,)`` when the
    backward's recompute runs unsegmented: packed sequences, kept states, no tokens, or enough sequences × heads);
    the custom ops' fake implementations take it from here."""
    if packed or keep or B * T == 0:
        return (0,)
    lay = _Layout(B, T, None, torch.device("cpu"))
    seg = recompute_segment_chunks(lay, H, K, V)
    return (lay.segments(seg)[1], H, K, V) if seg else (0,)


def fused_forward(K: int) -> bool:
    """Whether a forward that keeps no states runs fused (``_fwd_ho_kernel``: the state pass and the output in one)
    at key head dim K. One that keeps them runs the state pass apart, writing h for the output kernel."""
    return bool(CONFIG["fwd_ho"]["enable"]) and CONFIG["fwd_ho"]["max_k"] >= K


def save_states() -> bool:
    """Whether the delta rule's forward keeps ``h`` and ``V_new`` for the backward (``CONFIG["bwd_h"]``)."""
    return bool(CONFIG["bwd_h"]["save"])


def states_shape(B: int, T: int, H: int, K: int, V: int, n_seqs: int | None) -> tuple[int, int, int, int]:
    """Shape of the per-chunk states ``h`` kept by the forward: ``[NC, H, K, V]`` with NC the number of
    chunks, for packed sequences (``n_seqs`` of them in ``B·T = T`` tokens) its bound ``⌈T/64⌉ + n_seqs``."""
    return (triton.cdiv(T, BT) + n_seqs if n_seqs is not None else B * triton.cdiv(T, BT)), H, K, V


def chunk_fwd(
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
    keep_states: bool = False,
    xd: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Forward. q, k ``[B, T, HK, K]``; v ``[B, T, H, V]``; beta/g ``[B, T, H]`` (contiguous, one dtype
    for q/k/v). Returns ``(o [B, T, H, V], final state [N, H, K, V] float32 or None, Tm, w, u, h, vn, hs)``
    where ``Tm`` [B, T, H, 64] float32, ``w`` [B, T, H, K], ``u`` like v (None without the delta rule),
    with ``keep_states`` (delta rule only) the chunk states ``h`` (:func:`states_shape`) and ``V_new``
    like v for :func:`chunk_bwd`, else None, and ``hs`` the float32 states entering the backward recompute's
    segments ``[segments, H, K, V]`` (:func:`recompute_segment_chunks`; None when it runs unsegmented).

    Scaled values (gated linear attention only): with ``xd [B, T, H]`` float32, ``v`` is x (any token
    stride, see :func:`token_stride`) and the values are ``x·xd``; ``D`` (``[H]`` or ``[H, V]``) adds ``D·x``
    to the output.

    Head dims below ``MIN_HEAD_DIM_16BIT`` with 16-bit inputs on a GPU run zero-padded (see there)."""
    B, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[3]
    Kp, Vp = _padded_dims(q, K, V)
    if (Kp, Vp) != (K, V):
        o, ht, Tm, w, u, h, vn, hs = chunk_fwd(
            _pad(q, Kp), _pad(k, Kp), _pad(v, Vp), beta, g, scale, _pad(initial_state, Kp, Vp), output_final_state,
            cu_seqlens, use_delta, keep_states, xd, _pad(D, Vp) if D is not None and D.dim() == 2 else D,
        )  # fmt: skip
        crop = _crop(ht, K, V), Tm, _crop(w, K), _crop(u, V), _crop(h, K, V), _crop(vn, V), _crop(hs, K, V)
        return o[..., :V].contiguous(), *crop
    lay = _Layout(B, T, cu_seqlens, q.device)
    dev = q.device
    XD = _scaled_values(xd, D, use_delta, keep_states)
    svt = token_stride(v) if XD else H * V
    xd_, D_ = (xd, D if D is not None else xd) if XD else (v, v)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    ht = torch.empty(lay.N, H, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    if lay.NC == 0:
        if ht is not None:
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return o, ht, None, None, None, None, None, None
    dummy = o
    use_g = g is not None
    gp = g if use_g else dummy
    Tm = w = u = None
    if use_delta:
        Tm = torch.empty(B, T, H, BT, dtype=torch.float32, device=dev)
        w = torch.empty(B, T, H, K, dtype=q.dtype, device=dev)
        u = torch.empty_like(v)
        BK, _, kw = _launch("kkt_solve", K, V)
        cfg = CONFIG["kkt_solve"]
        split = bool(cfg["split"])
        for phase, nw in ((1, cfg["kkt_warps"]), (2, cfg["solve_warps"])) if split else ((0, kw["num_warps"]),):
            _fit(_kkt_solve_kernel)[(lay.NC, H)](
                k, beta, gp, Tm, lay.cu_seqlens, lay.chunk_indices, lay.T, lay.NT,
                H=H, HK=HK, K=K, BT=BT, BK=BK, USE_G=use_g, IS_VARLEN=lay.is_varlen,
                ROW_REGS=bool(cfg["row_regs"]), PHASE=phase, num_warps=nw, num_stages=kw["num_stages"],
            )  # fmt: skip
        BK, BV, kw = _launch("wu_fwd", K, V)
        _fit(_wu_fwd_kernel)[(lay.NC, H)](
            k, v, beta, gp, Tm, w, u, lay.cu_seqlens, lay.chunk_indices, lay.T, lay.NT,
            H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, IS_VARLEN=lay.is_varlen, **kw,
        )  # fmt: skip
    keep = keep_states and use_delta
    seg = 0 if keep else recompute_segment_chunks(lay, H, K, V)
    hs = torch.empty(lay.segments(seg)[1], H, K, V, dtype=torch.float32, device=dev) if seg else None
    fused = CONFIG["fwd_ho"]
    if not keep and fused_forward(K):
        BK, BV, kw = _launch("fwd_ho", K, V, seq=True, seq_heads=lay.N * H)
        if use_delta and _one_wave(triton.cdiv(V, BV) * lay.N * H, dev):
            kw["num_stages"] = fused["num_stages_one_wave"]
        g_cum = use_g and bool(fused["g_cumsum" if use_delta else "g_cumsum_gla"])
        _fit(_fwd_ho_kernel, _seq_floor(q))[(triton.cdiv(V, BV), lay.N * H)](
            q, k, u if use_delta else v, w if use_delta else dummy, _chunk_gate_cumsum(g, lay) if g_cum else gp, o,
            initial_state if initial_state is not None else dummy, ht if ht is not None else dummy,
            lay.cu_seqlens, xd_, D_, hs if seg else dummy, svt, scale, lay.T, lay.NT, max(seg, 1),
            H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, USE_DELTA=use_delta,
            USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=ht is not None,
            IS_VARLEN=lay.is_varlen, XD=XD, HAS_D=D is not None, D_PER_V=D is not None and D.dim() == 2,
            PREFETCH_V=bool(fused["prefetch_v_xd" if XD else "prefetch_v"]), SAVE_SEG=bool(seg),
            PREFETCH_G=bool(fused["prefetch_g_xd" if XD else "prefetch_g"]), G_CUM=g_cum, **kw,
        )  # fmt: skip
        return o, ht, Tm, w, u, None, None, hs
    nc = states_shape(B, T, H, K, V, lay.N if lay.is_varlen else None)[0] if keep else lay.NC
    h = torch.empty(nc, H, K, V, dtype=q.dtype, device=dev)
    vn = torch.empty_like(v) if use_delta else v
    _chunk_h(k, u if use_delta else v, w, g, h, vn, initial_state, ht, lay, use_delta, xd if XD else None,
             hs=hs, seg=seg, save_seg=True)  # fmt: skip
    BK, BV, kw = _launch("fwd_o", K, V)
    _fit(_fwd_o_kernel)[(triton.cdiv(V, BV), lay.NC, H)](
        q, k, vn, gp, h, o, lay.cu_seqlens, lay.chunk_indices, xd_, D_, svt, scale, lay.T, lay.NT,
        H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, IS_VARLEN=lay.is_varlen,
        XD=XD, HAS_D=D is not None, D_PER_V=D is not None and D.dim() == 2, **kw,
    )  # fmt: skip
    return o, ht, Tm, w, u, (h if keep else None), (vn if keep else None), hs


#: Head dims the kernels run at with 16-bit inputs on a GPU: K at least ``MIN_HEAD_DIM_16BIT``, V at least
#: ``min(max(K, MIN_HEAD_DIM_16BIT), 64)``; smaller ones are zero-padded (exact: padded q/k columns add nothing
#: to q·k, padded value columns give outputs that are cut off). Triton 3.6 on an H100 (fp16 and bf16), head
#: dims (K, V): illegal memory accesses or wrong results at (32, 16), (64, 32) and (128, 32); correct at
#: (16, 16), (32, 32), (64, 64), (128, 64) and the models' (128, 128), (256, 512); with this padding also
#: (32, 16), (64, 16), (128, 16), (128, 48), (256, 32) and K = 16 with V = 64 (session 9).
MIN_HEAD_DIM_16BIT = 32


def _padded_dims(q: torch.Tensor, K: int, V: int) -> tuple[int, int]:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return K, V
    K = max(K, MIN_HEAD_DIM_16BIT)
    return K, max(V, min(K, 64))


def _pad(t: torch.Tensor | None, n: int, v: int | None = None) -> torch.Tensor | None:
    """Zero-pad ``t``'s last dim to ``n``; for states ``[..., K, V]`` (``v`` given) K to ``n`` and V to ``v``."""
    if t is None or t.numel() == 0:  # absent, or an empty placeholder of the custom ops
        return t
    if v is None:
        return torch.nn.functional.pad(t, (0, n - t.shape[-1]))
    return torch.nn.functional.pad(t, (0, v - t.shape[-1], 0, n - t.shape[-2]))


def _crop(t: torch.Tensor | None, *dims: int) -> torch.Tensor | None:
    """``t[..., :dims[0]]``, or ``t[..., :K, :V]`` for states, contiguous (None stays None)."""
    if t is None or t.numel() == 0:
        return t
    return (t[..., : dims[0]] if len(dims) == 1 else t[..., : dims[0], : dims[1]]).contiguous()


def token_stride(x: torch.Tensor) -> int:
    """Token stride of ``x [B, T, H, V]`` read as a packed token stream with heads ``V`` apart and unit stride
    along V (e.g. a channel slice of a wider per-token buffer); raises if ``x`` is not laid out so."""
    B, T, H, V = x.shape
    st = x.stride(1)
    ok = x.stride(3) == 1 and (H == 1 or x.stride(2) == V) and (B == 1 or T == 0 or x.stride(0) == T * st)
    if not ok:
        raise ValueError(f"chunk kernels: scaled values need heads V apart and evenly spaced tokens, got strides "
                         f"{tuple(x.stride())} for shape {tuple(x.shape)}; pass x.contiguous()")  # fmt: skip
    return st


def _scaled_values(xd: torch.Tensor | None, D: torch.Tensor | None, use_delta: bool, keep: bool) -> bool:
    if xd is None:
        if D is not None:
            raise ValueError("chunk kernels: the D skip needs scaled values (xd)")
        return False
    if use_delta or keep:
        raise ValueError("chunk kernels: scaled values (xd) serve gated linear attention only")
    if xd.dtype != torch.float32 or not xd.is_contiguous():
        raise ValueError(f"chunk kernels: xd must be contiguous float32 [B, T, H], got {xd.dtype}")
    return True


def _chunk_gate_cumsum(g: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """The gate's cumulative sum inside each chunk, ``G`` (float32, like g ``[B, T, H]``): what the sequential kernels
    otherwise scan for on every chunk (``G_CUM``)."""
    H = g.shape[-1]
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    bh = min(_np2(H), CONFIG["dg_finalize"]["heads"])
    _fit(_dg_finalize_kernel)[(lay.NC, triton.cdiv(H, bh))](
        g, gc, lay.cu_seqlens, lay.chunk_indices, lay.T, lay.NT, lay.ntok, NS=1, H=H, BT=BT, BH=bh,
        IS_VARLEN=lay.is_varlen, REVERSE=False, num_warps=4,
    )  # fmt: skip
    return gc


def _chunk_h(k, vsrc, w, g, h, vn, initial_state, ht, lay, use_delta, xd=None, hs=None, seg=0, save_seg=False):
    """Run the sequential state kernel: fills ``h`` (and ``vn`` with the delta rule), optionally ``ht``;
    with ``xd`` the values are ``vsrc·xd`` (vsrc any token stride), written to ``vn`` unless it is vsrc.
    With ``seg`` chunks per segment and ``hs``: ``save_seg`` stores the states entering the segments in ``hs``,
    else each segment runs from its state in ``hs`` (in parallel; the initial state is in ``hs`` already)."""
    HK, K = k.shape[2], k.shape[3]
    H, V = vsrc.shape[2], vsrc.shape[3]
    dummy = vsrc
    from_seg = bool(seg) and not save_seg
    n_seg = lay.segments(seg)[0] if seg else 1
    if from_seg and ht is not None:
        raise ValueError("chunk kernels: a segmented state recompute cannot return the final state")
    BK, BV, kw = _launch("fwd_h", K, V, seq=True, seq_heads=lay.N * H * (n_seg if from_seg else 1))
    grid = (triton.cdiv(V, BV), lay.N * H, n_seg) if from_seg else (triton.cdiv(V, BV), lay.N * H)
    _fit(_fwd_h_kernel, _seq_floor(k))[grid](
        k, vsrc, w if w is not None else dummy, g if g is not None else dummy, h, vn,
        initial_state if initial_state is not None else dummy, ht if ht is not None else dummy,
        lay.cu_seqlens, lay.chunk_offsets, xd if xd is not None else dummy, hs if seg else dummy,
        token_stride(vsrc) if xd is not None else H * V, lay.T, lay.NT, max(seg, 1),
        H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=g is not None, USE_DELTA=use_delta,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=ht is not None,
        SAVE_VNEW=use_delta or (xd is not None and vn is not vsrc), IS_VARLEN=lay.is_varlen, XD=xd is not None,
        SAVE_SEG=bool(seg) and save_seg, FROM_SEG=from_seg, **kw,
    )  # fmt: skip


def chunk_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    Tm: torch.Tensor | None,
    w: torch.Tensor | None,
    u: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    use_delta: bool,
    h: torch.Tensor | None = None,
    vn: torch.Tensor | None = None,
    xd: torch.Tensor | None = None,
    hs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward. Returns ``(dq, dk, dv, dbeta, dg, dh0)``: dq/dk/dv in the inputs' dtype and shapes
    (grouped q/k gradients summed over their value heads in-kernel), dbeta/dg float32 ``[B, T, H]``
    (None when unused), dh0 float32 (None without an initial state). The delta rule needs H == HK.
    ``h``, ``vn``: the forward's chunk states and V_new (``keep_states``); recomputed when None, in parallel
    segments from ``hs`` (the forward's segment states) when given.

    With scaled values (``xd`` as in :func:`chunk_fwd`; the forward's D skip has no part here) the third
    gradient is dV, the gradient of the values ``x·xd`` (contiguous). Small head dims are padded as in
    :func:`chunk_fwd`."""
    B, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[3]
    Kp, Vp = _padded_dims(q, K, V)
    if (Kp, Vp) != (K, V):
        dq, dk, dv, dbeta, dg, dh0 = chunk_bwd(
            _pad(q, Kp), _pad(k, Kp), _pad(v, Vp), beta, g, scale, _pad(initial_state, Kp, Vp), cu_seqlens, Tm,
            _pad(w, Kp), _pad(u, Vp), _pad(do, Vp), _pad(dht, Kp, Vp), use_delta, _pad(h, Kp, Vp), _pad(vn, Vp), xd,
            _pad(hs, Kp, Vp),
        )  # fmt: skip
        return dq[..., :K].contiguous(), dk[..., :K].contiguous(), dv[..., :V].contiguous(), dbeta, dg, _crop(dh0, K, V)
    dev = q.device
    lay = _Layout(B, T, cu_seqlens, dev)
    f32 = torch.float32
    use_g = g is not None
    XD = _scaled_values(xd, None, use_delta, False)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    dbeta = torch.empty(B, T, H, dtype=f32, device=dev) if use_delta else None
    dg = torch.empty(B, T, H, dtype=f32, device=dev) if use_g else None
    dh0 = torch.empty_like(initial_state, dtype=f32) if initial_state is not None else None
    if lay.NC == 0:
        dq.zero_()
        dk.zero_()
        if dh0 is not None:
            dh0.copy_(dht if dht is not None else torch.zeros_like(dh0))
        return dq, dk, dv, dbeta, dg, dh0
    do = do.contiguous()
    dummy = do
    gp = g if use_g else dummy
    g_cums: list[torch.Tensor] = []

    def _gc() -> torch.Tensor:  # the gate's per-chunk cumulative sum, formed once for the kernels that read it
        if not g_cums:
            g_cums.append(_chunk_gate_cumsum(g, lay))
        return g_cums[0]

    if h is None or vn is None:  # recompute the chunk states and V_new (scaled values: V itself, for dqkwg)
        h = torch.empty(lay.NC, H, K, V, dtype=q.dtype, device=dev)
        vn = torch.empty(B, T, H, V, dtype=v.dtype, device=dev) if use_delta or XD else v
        seg = recompute_segment_chunks(lay, H, K, V) if hs is not None and hs.numel() else 0
        if seg and hs.shape != (lay.segments(seg)[1], H, K, V):
            raise ValueError(f"chunk_bwd: segment states of shape {tuple(hs.shape)} do not match this layout "
                             f"({lay.segments(seg)[1]} segments of {seg} chunks); pass the forward's hs")  # fmt: skip
        _chunk_h(k, u if use_delta else v, w, g, h, vn, initial_state, None, lay, use_delta, xd if XD else None,
                 hs=hs if seg else None, seg=seg)  # fmt: skip
    # intra-chunk part of dV_new, then the reverse state pass
    dh_cfg = CONFIG["bwd_dh"]
    local_dv = bool(dh_cfg["fold_dv"]) and dh_cfg["fold_max_k"] >= K
    if use_delta and use_g:  # the gated delta rule gains only while the sequential pass has programs to spare
        local_dv = local_dv and dh_cfg["fold_gated_delta_min_seq_heads"] <= lay.N * H
    dvl = do  # a placeholder argument when the pass forms the intra-chunk dV itself
    if not local_dv:
        dvl = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
        BK, BV, kw = _launch("dv_local", K, V)
        hb = _heads_per_block(H // HK, CONFIG["dv_local"]["heads"])
        _fit(_bwd_dv_local_kernel)[(lay.NC, H // hb)](
            q, k, gp, do, dvl, lay.cu_seqlens, lay.chunk_indices, scale, lay.T, lay.NT,
            H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, IS_VARLEN=lay.is_varlen, HB=hb, **kw,
        )  # fmt: skip
    dh = torch.empty(lay.NC, H, K, V, dtype=q.dtype, device=dev)
    dvn = torch.empty_like(v) if use_delta else dv
    BK, BV, kw = _launch("bwd_dh", K, V, seq=True)
    if not use_delta and K <= 128 and dh_cfg["gla_min_programs"] <= lay.N * H:  # SSD: a wider V tile (see CONFIG)
        BV = min(dh_cfg["BV_gla"], _np2(V))
    if use_delta and not use_g and _one_wave(triton.cdiv(V, BV) * lay.N * H, dev):
        kw["num_stages"] = dh_cfg["num_stages_one_wave_ungated"]
    prefetch_g = bool(dh_cfg["prefetch_g_k256" if K > 128 else "prefetch_g" if use_delta else "prefetch_g_gla"])
    _fit(_bwd_dh_kernel, _seq_floor(q))[(triton.cdiv(V, BV), lay.N * H)](
        q, k, w if use_delta else dummy, gp, do, dvl, dh, dvn,
        dht if dht is not None else dummy, dh0 if dh0 is not None else dummy,
        lay.cu_seqlens, lay.chunk_offsets, scale, lay.T, lay.NT,
        H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g, USE_DELTA=use_delta,
        USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=dh0 is not None,
        IS_VARLEN=lay.is_varlen, LOCAL_DV=local_dv, PREFETCH_G=prefetch_g, **kw,
    )  # fmt: skip
    # dq, dk, dw and the K tiles' shares of dG
    dq_cfg = "dqkwg" if use_delta else "dqkwg_ssd"
    BK, BV, kw = _launch(dq_cfg, K, V)
    if use_delta and not use_g:  # the ungated kernel is faster with narrower V tiles (H100, v4)
        BV = min(BV, CONFIG["dqkwg"]["BV_ungated"])
    lean = use_g and bool(CONFIG[dq_cfg].get("lean", 0))  # gated kernel only (see _bwd_dqkwg_kernel)
    if use_g and CONFIG[dq_cfg].get("maxnreg", 0):
        kw["maxnreg"] = CONFIG[dq_cfg]["maxnreg"]
    if lean and CONFIG[dq_cfg].get("num_stages_lean"):
        kw["num_stages"] = CONFIG[dq_cfg]["num_stages_lean"]
    NK = triton.cdiv(K, BK)
    split = use_g and not use_delta and bool(CONFIG["dqkwg_ssd"].get("split", 0))
    ns = NK + (1 if use_delta or split else 0)  # dG slots: the K tiles' shares, then the WY / intra-chunk share
    dG = torch.empty(ns, B * T, H, dtype=f32, device=dev) if use_g else dummy
    dw = torch.empty(B, T, H, K, dtype=q.dtype, device=dev) if use_delta else dummy
    # the WY part comes next; dk_part_f32 0 stores the partial in the input dtype (half the traffic, one rounding more)
    dk_dt = f32 if CONFIG["dqkwg"]["dk_part_f32"] else q.dtype
    dk_part = torch.empty(B, T, H, K, dtype=dk_dt, device=dev) if use_delta else dk
    if split:
        hb = _heads_per_block(H // HK, CONFIG["dp_sum"]["heads"])
        dPs = torch.empty(lay.NC, H // hb, BT, BT, dtype=f32, device=dev)
        BKp, BVp, kwp = _launch("dp_sum", K, V)
        if CONFIG["dp_sum"].get("maxnreg", 0):
            kwp["maxnreg"] = CONFIG["dp_sum"]["maxnreg"]
        _fit(_bwd_dp_sum_kernel)[(lay.NC, H // hb)](
            q, k, vn, gp, do, dPs, dG, lay.cu_seqlens, lay.chunk_indices, scale, lay.T, lay.NT, B * T, NK,
            H=H, HK=HK, K=K, V=V, BT=BT, BK=BKp, BV=BVp, HB=hb, IS_VARLEN=lay.is_varlen, **kwp,
        )  # fmt: skip
        _fit(_bwd_dqkg_inter_kernel)[(NK, lay.NC, HK)](
            q, k, vn, gp, h, do, dh, dPs, dq, dk, dG, lay.cu_seqlens, lay.chunk_indices, scale, lay.T, lay.NT, B * T,
            H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, HB=hb, IS_VARLEN=lay.is_varlen, **kw,
        )  # fmt: skip
    else:
        g_cum = use_g and use_delta and bool(CONFIG["dqkwg"]["g_cumsum"])
        _fit(_bwd_dqkwg_kernel)[(NK, lay.NC, HK)](
            q, k, vn, _gc() if g_cum else gp, h, do, dh, dvn, dq, dk_part, dw, dG, lay.cu_seqlens, lay.chunk_indices,
            scale, lay.T, lay.NT, B * T, H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=use_g,
            USE_DELTA=use_delta, IS_VARLEN=lay.is_varlen, LEAN=lean, G_CUM=g_cum, **kw,
        )  # fmt: skip
    if use_delta:
        BK, BV, kw = _launch("wy_bwd", K, V)
        g_cum = use_g and bool(CONFIG["wy_bwd"]["g_cumsum"])
        _fit(_wy_bwd_kernel)[(lay.NC, H)](
            k, v, beta, _gc() if g_cum else gp, Tm, dvn, dw, dk_part, dk, dv, dbeta, dG, lay.cu_seqlens,
            lay.chunk_indices, lay.T, lay.NT, B * T, NK, H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV,
            USE_G=use_g, IS_VARLEN=lay.is_varlen, G_CUM=g_cum, **kw,
        )  # fmt: skip
    if use_g:
        bh = min(_np2(H), CONFIG["dg_finalize"]["heads"])
        _fit(_dg_finalize_kernel)[(lay.NC, triton.cdiv(H, bh))](
            dG, dg, lay.cu_seqlens, lay.chunk_indices, lay.T, lay.NT, B * T, NS=ns, H=H, BT=BT, BH=bh,
            IS_VARLEN=lay.is_varlen, num_warps=4,
        )  # fmt: skip
    return dq, dk, dv, dbeta, dg, dh0
