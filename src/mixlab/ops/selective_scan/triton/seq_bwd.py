"""Selective-scan backward v3: channels across lanes, time inside each thread.

Tiles are ``[BD, BT]``: each thread holds ``BT`` consecutive time steps of ``BD / (32 num_warps)`` channel
rows, so both scans over time (state h forward, adjoint g in reverse) are in-thread sequential chains
(``tl.associative_scan`` along axis 1 lowers to BT - 1 combines, no shuffles). Program = (block of BD
channels, batch[, time segment]); it walks the blocks of ``block_l`` steps in reverse order (``seq_bwd_so_kernel``,
"state-outer"). Per block the block's tiles (J = block_l / BT sub-tiles, held in tuples) are loaded once; then per
state n, h runs forward over the whole block from the forward's saved ``states[c]`` (kept in registers) and the
adjoint ``g_t = dy_t C_t + a_{t+1} g_{t+1}`` in reverse from the carried ``q = a g`` (a ``[B, N, D]`` buffer that
starts as d(last state) and ends as d(initial state)); q and dA are touched once per (block, state) and the next
state's operands are prefetched a state of work ahead. The block's ~8 tiles fit 255 registers on sm_90 at block_l
16 with one channel a thread; longer blocks spill.

Per state n the gradients accumulate as ``sgB = sum_n g B`` and ``sgAh = sum_n g A a_t h_{t-1}``:
``du = delta sgB + D dy``, ``ddelta = u sgB + sgAh`` (times softplus'), ``dA[d, n] = sum_t g delta a_t h_{t-1}``
(read-modify-write of the program's own rows of a ``[B, N, D]`` buffer). dB and dC are sums over channels:
per warp by recursive halving across lanes (or ``tl.sum``), then float32 atomics into ``[B, G, N, L]`` as in v2.
Carried rows (q, dA) are written and read back by the thread that owns them, so no barriers are needed.

An earlier sub-chunk-outer kernel (states inner, a stash of sub-chunk states, q and dA carried through global
memory per sub-chunk) ran 15.0 ms against this one's 10.1 at B32 T2048 on an H100 and was removed
(benchmarks/NOTES-mamba-kernels.md §9).
"""

# ruff: noqa: RUF005  (tuples of tiles are built by concatenation: the Triton frontend has no starred unpacking)
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fastmath import exp2, sigmoid
from .kernels import LOG2E, _scan_combine
from .op import bwd_buffers, bwd_launch_args, bwd_outputs, state_dtype
from .seq_fwd import _keep_last, _softplus_dl

Tensor = torch.Tensor


@triton.jit
def _rev_adjoint(a, c, q, BD: tl.constexpr, BT: tl.constexpr):
    """``g_t = c_t + a_{t+1} g_{t+1}`` over a [BD, BT] tile's in-thread columns, with ``g_{BT-1} = c_{BT-1} + q``
    (q [BD]: the carry a g from the step after the tile). Returns (g [BD, BT], a_0 g_0 [BD]).

    Written out column by column (reshape + split / join keep the registers in place): Triton 3.6 lowers a
    ``reverse=True`` associative_scan with a flip of every operand across the lanes (5 shuffles each, in and out)
    even when no lanes lie along the scanned axis."""
    if BT == 1:
        g = c + q[:, None]
        qo = tl.sum(a * g, 1)
    elif BT == 2:
        a0, a1 = tl.split(a)
        c0, c1 = tl.split(c)
        g1 = c1 + q
        g0 = c0 + a1 * g1
        g = tl.join(g0, g1)
        qo = a0 * g0
    elif BT == 4:
        ae, ao = tl.split(tl.reshape(a, [BD, 2, 2]))
        a0, a2 = tl.split(ae)
        a1, a3 = tl.split(ao)
        ce, co = tl.split(tl.reshape(c, [BD, 2, 2]))
        c0, c2 = tl.split(ce)
        c1, c3 = tl.split(co)
        g3 = c3 + q
        g2 = c2 + a3 * g3
        g1 = c1 + a2 * g2
        g0 = c0 + a1 * g1
        g = tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), [BD, 4])
        qo = a0 * g0
    else:
        tl.static_assert(BT == 8, "seq_bwd: bt must be 1, 2, 4 or 8")
        a_0, a_1 = tl.split(tl.reshape(a, [BD, 2, 2, 2]))  # column 4i + 2j + k at [i, j, k]
        a00, a01 = tl.split(a_0)
        a10, a11 = tl.split(a_1)
        a0, a4 = tl.split(a00)
        a2, a6 = tl.split(a01)
        a1, a5 = tl.split(a10)
        a3, a7 = tl.split(a11)
        c_0, c_1 = tl.split(tl.reshape(c, [BD, 2, 2, 2]))
        c00, c01 = tl.split(c_0)
        c10, c11 = tl.split(c_1)
        c0, c4 = tl.split(c00)
        c2, c6 = tl.split(c01)
        c1, c5 = tl.split(c10)
        c3, c7 = tl.split(c11)
        g7 = c7 + q
        g6 = c6 + a7 * g7
        g5 = c5 + a6 * g6
        g4 = c4 + a5 * g5
        g3 = c3 + a4 * g4
        g2 = c2 + a3 * g3
        g1 = c1 + a2 * g2
        g0 = c0 + a1 * g1
        g_0 = tl.join(tl.join(g0, g4), tl.join(g2, g6))
        g_1 = tl.join(tl.join(g1, g5), tl.join(g3, g7))
        g = tl.reshape(tl.join(g_0, g_1), [BD, 8])
        qo = a0 * g0
    return g, qo


@triton.jit
def _bfly(x, XOR: tl.constexpr, INTERP: tl.constexpr):
    """Row w of a [W, K] float32 tile (row w in lane w % 32) gets row w ^ XOR: shfl.sync.bfly on the GPU, the same
    permutation by reshape / split / join under the interpreter."""
    if INTERP:
        W: tl.constexpr = x.shape[0]
        K: tl.constexpr = x.shape[1]
        y = tl.permute(tl.reshape(x, [W // (2 * XOR), 2, XOR, K]), [0, 2, 3, 1])
        lo, hi = tl.split(y)
        return tl.reshape(tl.permute(tl.join(hi, lo), [0, 3, 1, 2]), [W, K])
    else:
        return tl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;",
            "=r,r,r",
            [x, tl.full(x.shape, XOR, tl.int32)],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )


@triton.jit
def _halve(v, lane, XOR: tl.constexpr, INTERP: tl.constexpr):
    """One recursive-halving round over a [W, M] tile: lanes with bit XOR set keep the odd columns, the others the
    even ones, and each adds its partner's (lane ^ XOR) copy: [W, M / 2]."""
    W: tl.constexpr = v.shape[0]
    M: tl.constexpr = v.shape[1]
    v0, v1 = tl.split(tl.reshape(v, [W, M // 2, 2]))
    up = ((lane & XOR) != 0)[:, None]
    return tl.where(up, v1, v0) + _bfly(tl.where(up, v0, v1), XOR, INTERP)


@triton.jit
def _add_db_dc(
    gdu, dyh, dB_row, dC_row, t0, L, BD: tl.constexpr, BT: tl.constexpr, R: tl.constexpr, INTERP: tl.constexpr
):
    """dB[t] += sum_d gdu[d, t], dC[t] += sum_d dyh[d, t] (float32 atomics; dB_row / dC_row point at step 0 of
    state n) by recursive halving within each warp: 2 BT columns need log2(2 BT) halving rounds (2 BT - 1 shuffles)
    and 5 - log2(2 BT) butterfly rounds (one shuffle each), instead of 5 rounds per column for a tl.sum."""
    W: tl.constexpr = BD // R
    if R > 1:  # tile row k is held by thread k % W: first the in-thread sum
        sB = tl.sum(tl.reshape(gdu, [R, W, BT]), 0)
        sC = tl.sum(tl.reshape(dyh, [R, W, BT]), 0)
    else:
        sB = gdu
        sC = dyh
    v = tl.reshape(tl.join(sB, sC), [W, 2 * BT])  # column 2 t + (0: dB, 1: dC)
    lane = tl.arange(0, W) % 32
    v = _halve(v, lane, 16, INTERP)  # column bit 0 <- lane bit 4
    col = (lane >> 4) & 1
    if BT >= 2:
        v = _halve(v, lane, 8, INTERP)
        col += ((lane >> 3) & 1) << 1
    if BT >= 4:
        v = _halve(v, lane, 4, INTERP)
        col += ((lane >> 2) & 1) << 2
    if BT >= 8:
        v = _halve(v, lane, 2, INTERP)
        col += ((lane >> 1) & 1) << 3
    # the remaining lane bits: plain butterfly rounds
    v += _bfly(v, 1, INTERP)
    if BT <= 4:
        v += _bfly(v, 2, INTERP)
    if BT <= 2:
        v += _bfly(v, 4, INTERP)
    if BT <= 1:
        v += _bfly(v, 8, INTERP)
    LOW: tl.constexpr = 16 // BT  # lanes differing only in these low bits hold the same sums
    t = t0 + (col >> 1)
    ptr = tl.where((col & 1) == 0, dB_row, dC_row) + t
    tl.atomic_add(ptr, tl.reshape(v, [W]), mask=((lane % LOW) == 0) & (t < L), sem="relaxed")


@triton.jit
def _load_dl(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FP64: tl.constexpr,
             FAST: tl.constexpr, DERIV: tl.constexpr):  # fmt: skip
    """delta after bias / softplus ([BD, BT], zero where masked), or with DERIV its softplus derivative."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(CT)
    if HAS_BIAS:
        raw = raw + tl.load(bias_ptr + d).to(CT)[:, None]
    if DERIV:
        if FP64:
            return tl.sigmoid(raw)
        else:
            return sigmoid(raw, FAST)
    return _softplus_dl(raw, mask, SOFTPLUS, FP64, FAST)


@triton.jit
def _decay2(dl, a_row, FP64: tl.constexpr, FAST: tl.constexpr):
    # exp(dl * A) for a [BD, BT] tile and a [BD] row (pre-scaled by log2(e) in float32 mode)
    if FP64:
        return tl.exp(dl * a_row[:, None])
    else:
        return exp2(dl * a_row[:, None], FAST)


@triton.jit
def _loads_so(A_row, B_base, C_base, st_row, gq_row, dA_row, t0, tt, L, n, DIM, stride_bn, stride_cn,
              BT: tl.constexpr, J: tl.constexpr):  # fmt: skip
    """State-outer operands of state n for one block: A[d, n], the block's B and C rows as J [BT] vectors each,
    entering state, carried adjoint q and dA so far ([BD] each)."""
    Bs = ()
    Cs = ()
    for j in tl.static_range(J):
        t = t0 + j * BT + tt
        Bs = Bs + (tl.load(B_base + n * stride_bn + t, mask=t < L, other=0.0),)
        Cs = Cs + (tl.load(C_base + n * stride_cn + t, mask=t < L, other=0.0),)
    return (
        tl.load(A_row + n),
        Bs,
        Cs,
        tl.load(st_row + n * DIM, eviction_policy="evict_first"),  # read once
        tl.load(gq_row + n * DIM, eviction_policy="evict_last"),  # carried from block to block: kept in L2
        tl.load(dA_row + n * DIM, eviction_policy="evict_last"),
    )


@triton.jit
def _so_state(ops, n, ys, sgBs, sgAhs, dls, dlus, dys, first, t0, tt, L, gq_row, dA_row, DIM, dB_base, dC_base,
              stride_dbn, stride_dcn, BD: tl.constexpr, BT: tl.constexpr, J: tl.constexpr, R: tl.constexpr,
              HALVE: tl.constexpr, INTERP: tl.constexpr, FP64: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """State n of the state-outer kernel over one block: h forward over the J sub-tiles from the entering state,
    the adjoint in reverse from q[n]; returns the updated accumulators (ys, sgBs, sgAhs) and writes q[n], dA[n] and
    the dB / dC sums. ops: the state's operands from ``_loads_so``."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    a_nat, Bs, Cs, h_in, q_in, dA_in = ops
    a_nat = a_nat.to(CT)
    a_row = a_nat
    if not FP64:
        a_row = a_nat * LOG2E
    hc = h_in.to(CT)
    hs = ()
    decs = ()
    ny = ()
    for j in tl.static_range(J):  # h forward over the block
        Bn = Bs[j].to(CT)[None, :]
        a = _decay2(dls[j], a_row, FP64, FAST)
        _, h = tl.associative_scan((a, dlus[j] * Bn + tl.where(first, a * hc[:, None], 0.0)), 1, _scan_combine)
        hc = tl.reduce(h, 1, _keep_last)
        ny = ny + (ys[j] + h * Cs[j].to(CT)[None, :],)
        hs = hs + (h,)
        decs = decs + (a,)
    ys = ny
    q = q_in.to(CT)
    dA_n = dA_in
    rB = ()
    rA = ()
    for jr in tl.static_range(J - 1, -1, -1):  # adjoint in reverse over the block
        Bn = Bs[jr].to(CT)[None, :]
        Cn = Cs[jr].to(CT)[None, :]
        g, q = _rev_adjoint(decs[jr], dys[jr] * Cn, q, BD, BT)
        gdu = g * dlus[jr]
        p = hs[jr] * g - gdu * Bn  # g (h - dlu B) = g a_t h_{t-1}
        rA = rA + (sgAhs[jr] + p * a_nat[:, None],)
        rB = rB + (sgBs[jr] + g * Bn,)
        dA_n += tl.sum(p * dls[jr], 1)
        tb = t0 + jr * BT
        if HALVE:
            _add_db_dc(gdu, dys[jr] * hs[jr], dB_base + n * stride_dbn, dC_base + n * stride_dcn, tb, L, BD, BT,
                       R, INTERP)  # fmt: skip
        else:
            t = tb + tt
            tl.atomic_add(dB_base + n * stride_dbn + t, tl.sum(gdu, 0), mask=t < L, sem="relaxed")
            tl.atomic_add(dC_base + n * stride_dcn + t, tl.sum(dys[jr] * hs[jr], 0), mask=t < L, sem="relaxed")
    sgBs = ()
    sgAhs = ()
    for j in tl.static_range(J):
        sgBs = sgBs + (rB[J - 1 - j],)
        sgAhs = sgAhs + (rA[J - 1 - j],)
    tl.store(gq_row + n * DIM, q, eviction_policy="evict_last")
    tl.store(dA_row + n * DIM, dA_n, eviction_policy="evict_last")
    return ys, sgBs, sgAhs


@triton.jit
def _prefetch_l1(ptr):
    """``prefetch.global.L1`` of each address (GPU only; the result is a dummy so that the asm is kept)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L1 [$1];\n mov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def seq_bwd_so_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    states_ptr,
    gq_ptr,
    dout_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    dD_part_ptr,
    dbias_part_ptr,
    DIM,
    L,
    N,
    N_CHUNKS,
    CH_PER_GROUP,
    stride_bb,
    stride_bg,
    stride_bn,
    stride_cb,
    stride_cg,
    stride_cn,
    stride_dbb,
    stride_dbg,
    stride_dbn,
    stride_dcb,
    stride_dcg,
    stride_dcn,
    BD: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    R: tl.constexpr,
    HALVE: tl.constexpr,
    PREFETCH: tl.constexpr,
    FAST: tl.constexpr,
    KEEP_GZ: tl.constexpr,
    INTERP: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
    PF_NEXT: tl.constexpr = 0,
    SEG_BLOCKS=0,
    SEGMENTED: tl.constexpr = 0,
):
    """State-outer order: per block of BLOCK_L steps (reverse order) the block's tiles (J = BLOCK_L / BT sub-tiles
    [BD, BT], held in tuples) are loaded once; then per state n: h forward over the block from ``states[c]`` (kept in
    registers), the adjoint in reverse from the carried q[n], accumulating y, sgB, sgAh for the whole block; q, dA
    are touched once per (block, state).

    u, delta, z, dout, du, ddelta, dz ``[B, D, L]``; states ``[B, N_CHUNKS + 1, N, D]``; gq ``[S, B, N, D]`` (in:
    the adjoint carried into each segment's end, out: d(state entering it)); dA ``[S, B, N, D]`` (zeroed); dB, dC
    ``[B, G, N, L]`` float (zeroed); dD_part, dbias_part ``[S, B, D]``. With SEGMENTED, grid axis 2 splits the blocks
    into S segments of SEG_BLOCKS, each started from its own carry gq[s] (``seq_bwd_carry_kernel``); else S = 1."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    J: tl.constexpr = BLOCK_L // BT
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kk = tl.arange(0, BD)
    d = pid_d * BD + (kk % (BD // R)) * R + kk // (BD // R)
    grp = (pid_d * BD) // CH_PER_GROUP
    tt = tl.arange(0, BT)
    row = (b * DIM + d).to(tl.int64) * L
    first = (tt == 0)[None, :]
    ND = N * DIM
    dD_acc = tl.zeros([BD], dtype=CT)
    dbias_acc = tl.zeros([BD], dtype=CT)
    if HAS_D:
        Dv = tl.load(D_ptr + d).to(CT)
    B_base = B_ptr + b * stride_bb + grp * stride_bg
    C_base = C_ptr + b * stride_cb + grp * stride_cg
    dB_base = dB_ptr + b * stride_dbb + grp * stride_dbg
    dC_base = dC_ptr + b * stride_dcb + grp * stride_dcg
    A_row = A_ptr + d * N
    if SEGMENTED:  # a constexpr switch: unsplit, the loop is exactly the one-segment kernel's (H100: 0.14 ms less)
        seg = tl.program_id(2)
        sb = seg * tl.num_programs(1) + b  # (segment, batch) row of gq, dA and the partial sums
        c_lo = seg * SEG_BLOCKS
        c_hi = tl.minimum(c_lo + SEG_BLOCKS, N_CHUNKS)
    else:
        sb = b
        c_lo = 0
        c_hi = N_CHUNKS
    gq_row = gq_ptr + sb * ND + d
    dA_row = dA_ptr + sb * ND + d
    for ci in range(0, c_hi - c_lo):
        c = c_hi - 1 - ci
        t0 = c * BLOCK_L
        st_row = states_ptr + (b * (N_CHUNKS + 1) + c) * ND + d
        dls = ()
        dlus = ()
        dys = ()
        gzs = ()
        for j in tl.static_range(J):
            t = t0 + j * BT + tt
            mask = (t < L)[None, :]
            offs = row[:, None] + t[None, :]
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
            dl = _load_dl(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS, SOFTPLUS, FP64, FAST, False)
            dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(CT)
            if HAS_Z:
                zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CT)
                sz = sigmoid(zz, FAST)
                if KEEP_GZ:
                    gzs = gzs + (dy * sz * (1.0 + zz * (1.0 - sz)),)
                dy = dy * zz * sz
            dls = dls + (dl,)
            dlus = dlus + (dl * u,)
            dys = dys + (dy,)
        if PF_NEXT:
            # the previous block's rows of u, delta, dout and z into L1 now (no registers held): its tile loads then
            # hit L1 instead of waiting on HBM at the top of the next block
            pf = row + tl.maximum(c - 1, 0) * BLOCK_L
            _prefetch_l1(u_ptr + pf)
            _prefetch_l1(delta_ptr + pf)
            _prefetch_l1(dout_ptr + pf)
            if HAS_Z:
                _prefetch_l1(z_ptr + pf)
        ys = ()
        sgBs = ()
        sgAhs = ()
        for _j in tl.static_range(J):
            ys = ys + (tl.zeros([BD, BT], dtype=CT),)
            sgBs = sgBs + (tl.zeros([BD, BT], dtype=CT),)
            sgAhs = sgAhs + (tl.zeros([BD, BT], dtype=CT),)
        nx = _loads_so(A_row, B_base, C_base, st_row, gq_row, dA_row, t0, tt, L, 0, DIM, stride_bn, stride_cn, BT, J)
        for n in range(0, N):
            if PREFETCH:  # a whole state of the block's work ahead
                ops = nx
                nx = _loads_so(
                    A_row, B_base, C_base, st_row, gq_row, dA_row, t0, tt, L, tl.minimum(n + 1, N - 1), DIM,
                    stride_bn, stride_cn, BT, J,
                )  # fmt: skip
            else:
                ops = _loads_so(
                    A_row, B_base, C_base, st_row, gq_row, dA_row, t0, tt, L, n, DIM, stride_bn, stride_cn, BT, J
                )
            if PREFETCH == 2:  # only the [BD] rows came ahead: B / C rows (L1 hits across the batch's programs) now
                a_nat, _, _, h_in, q_in, dA_in = ops
                _, Bs, Cs, _, _, _ = _loads_so(
                    A_row, B_base, C_base, st_row, gq_row, dA_row, t0, tt, L, n, DIM, stride_bn, stride_cn, BT, J
                )
                ops = (a_nat, Bs, Cs, h_in, q_in, dA_in)
            ys, sgBs, sgAhs = _so_state(
                ops, n, ys, sgBs, sgAhs, dls, dlus, dys, first, t0, tt, L, gq_row, dA_row, DIM, dB_base, dC_base,
                stride_dbn, stride_dcn, BD, BT, J, R, HALVE, INTERP, FP64, FAST,
            )  # fmt: skip
        # du, ddelta, dz are streamed out evict-first (.cs): with the default policy these 1.6 GB pushed the carried
        # q / dA (kept evict-last) and the block's inputs out of L2 (H100, B32 T2048: 5.2 -> 4.0 GB read from DRAM,
        # 2.8 -> 1.6 GB written, 9.8 -> 9.2 ms)
        for j in tl.static_range(J):
            t = t0 + j * BT + tt
            mask = (t < L)[None, :]
            offs = row[:, None] + t[None, :]
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
            dy = dys[j]
            y = ys[j]
            du = dls[j] * sgBs[j]
            ddl = u * sgBs[j] + sgAhs[j]
            if HAS_D:
                y += Dv[:, None] * u
                du += Dv[:, None] * dy
                dD_acc += tl.sum(dy * u, 1)
            if HAS_Z:
                if KEEP_GZ:
                    dz = gzs[j] * y
                else:
                    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(CT)
                    zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CT)
                    sz = sigmoid(zz, FAST)
                    dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
                tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask, cache_modifier=".cs")
            if SOFTPLUS:
                ddl = ddl * _load_dl(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS, SOFTPLUS, FP64, FAST, True)
            ddl = tl.where(mask, ddl, 0.0)
            dbias_acc += tl.sum(ddl, 1)
            tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask, cache_modifier=".cs")
            tl.store(ddelta_ptr + offs, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask, cache_modifier=".cs")
    part = sb * DIM + d
    tl.store(dD_part_ptr + part, dD_acc.to(dD_part_ptr.dtype.element_ty))
    tl.store(dbias_part_ptr + part, dbias_acc.to(dbias_part_ptr.dtype.element_ty))


@triton.jit
def seq_bwd_carry_kernel(
    delta_ptr,
    A_ptr,
    C_ptr,
    z_ptr,
    bias_ptr,
    dout_ptr,
    carry_ptr,
    sumdl_ptr,
    DIM,
    L,
    SEG_LEN,
    CH_PER_GROUP,
    stride_cb,
    stride_cg,
    stride_cn,
    N: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
    FAST: tl.constexpr,
):
    """Grid (DIM // BD, batch, S - 1): segment s + 1 (steps [(s + 1) SEG_LEN, (s + 2) SEG_LEN) within L) with the
    adjoint run in reverse from a zero carry (``g_t = a_{t+1} g_{t+1} + C_t dy_t``, dy through the z gate). Writes
    carry ``[S - 1, B, N, D]``: a g at the segment's first step, its part of what flows into the segment before;
    and sumdl ``[S - 1, B, D]``: the sum of delta (after bias / softplus) over it, so that the whole decay across
    the segment is ``exp(A sumdl)``. The carried adjoints are a tuple of N ``[BD]`` vectors (a [BD, N] tile would
    take A's n-contiguous layout and need cross-lane sums to pick a column)."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    grp = (pid_d * BD) // CH_PER_GROUP
    tt = tl.arange(0, BT)
    row = (b * DIM + d).to(tl.int64) * L
    C_row = C_ptr + b * stride_cb + grp * stride_cg
    sdl = tl.zeros([BD], dtype=CT)
    q = ()
    for _n in tl.static_range(N):
        q = q + (sdl,)
    bias = sdl
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(CT)
    t_lo = (s + 1) * SEG_LEN
    t_hi = tl.minimum(t_lo + SEG_LEN, L)
    n_tiles = tl.cdiv(t_hi - t_lo, BT)
    # masks compare with L rather than t_hi: its divisibility lets Triton vectorize the loads
    # the tiles' raw rows a tile ahead (a tile's loads would otherwise wait on HBM with one warp a program)
    t_nx = t_lo + (n_tiles - 1) * BT + tt
    m_nx = (t_nx < L)[None, :]
    offs_nx = row[:, None] + t_nx[None, :]
    raw_nx = tl.load(delta_ptr + offs_nx, mask=m_nx, other=0.0)
    dy_nx = tl.load(dout_ptr + offs_nx, mask=m_nx, other=0.0)
    z_nx = dy_nx
    if HAS_Z:
        z_nx = tl.load(z_ptr + offs_nx, mask=m_nx, other=0.0)
    for i in range(0, n_tiles):
        t = t_lo + (n_tiles - 1 - i) * BT + tt
        tmask = t < L  # tiles never cross into the next segment: SEG_LEN is a multiple of BT
        mask = tmask[None, :]
        raw, dy, zz = raw_nx.to(CT), dy_nx.to(CT), z_nx.to(CT)
        t_nx = t_lo + tl.maximum(n_tiles - 2 - i, 0) * BT + tt
        m_nx = (t_nx < L)[None, :]
        offs_nx = row[:, None] + t_nx[None, :]
        raw_nx = tl.load(delta_ptr + offs_nx, mask=m_nx, other=0.0)
        dy_nx = tl.load(dout_ptr + offs_nx, mask=m_nx, other=0.0)
        if HAS_Z:
            z_nx = tl.load(z_ptr + offs_nx, mask=m_nx, other=0.0)
        if HAS_BIAS:
            raw = raw + bias[:, None]
        dl = _softplus_dl(raw, mask, SOFTPLUS, FP64, FAST)
        if HAS_Z:
            dy = dy * zz * sigmoid(zz, FAST)
        sdl += tl.sum(dl, 1)
        nq = ()
        for n in tl.static_range(N):
            a_n = tl.load(A_ptr + d * N + n).to(CT)
            if not FP64:
                a_n = a_n * LOG2E
            Cn = tl.load(C_row + n * stride_cn + t, mask=tmask, other=0.0).to(CT)
            _, qo = _rev_adjoint(_decay2(dl, a_n, FP64, FAST), dy * Cn[None, :], q[n], BD, BT)
            nq = nq + (qo,)
        q = nq
    sb = s * tl.num_programs(1) + b
    for n in tl.static_range(N):
        tl.store(carry_ptr + (sb * N + n) * DIM + d, q[n].to(carry_ptr.dtype.element_ty))
    tl.store(sumdl_ptr + sb * DIM + d, sdl.to(sumdl_ptr.dtype.element_ty))


def segment_carries(
    u: Tensor, delta: Tensor, A: Tensor, C: Tensor, z: Tensor | None, delta_bias: Tensor | None, dout: Tensor,
    dlast: Tensor | None, delta_softplus: bool, seg_len: int, n_seg: int, bd: int, bt: int, fast: bool,
) -> Tensor:  # fmt: skip
    """The adjoint carried into each of ``n_seg`` segments of ``seg_len`` steps from the one after it, ``[S, B, N,
    D]`` (slot S - 1: d(last state) or zeros): the carry kernel's zero-started carries of segments 1 .. S - 1 chained
    from the end, ``q[s - 1] = carry[s] + exp(A sumdl[s]) q[s]``."""
    bsz, dim, length = u.shape
    n = A.shape[1]
    sd = state_dtype(u)
    gq = torch.zeros(n_seg, bsz, n, dim, device=u.device, dtype=sd)
    if dlast is not None:
        gq[-1].copy_(dlast.transpose(1, 2))
    if n_seg == 1:
        return gq
    carry = torch.empty(n_seg - 1, bsz, n, dim, device=u.device, dtype=sd)
    sumdl = torch.empty(n_seg - 1, bsz, dim, device=u.device, dtype=sd)
    dummy = u
    seq_bwd_carry_kernel[(dim // bd, bsz, n_seg - 1)](
        delta, A, C, z if z is not None else dummy, delta_bias if delta_bias is not None else dummy, dout, carry,
        sumdl, dim, length, seg_len, dim // C.shape[1], C.stride(0), C.stride(1), C.stride(2),
        N=n, BD=bd, BT=bt, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, FP64=sd == torch.float64, FAST=int(fast), num_warps=max(1, bd // 32),
    )  # fmt: skip
    a_t = A.t().to(sd)  # [N, D]
    for s in range(n_seg - 1, 0, -1):
        gq[s - 1] = carry[s - 1] + torch.exp(a_t * sumdl[s - 1][:, None, :]) * gq[s]
    return gq


def seq_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    states: Tensor,
    dout: Tensor,
    dlast: Tensor | None,
    delta_softplus: bool,
    block_l: int = 64,
    bt: int = 8,
    bd: int = 64,
    num_warps: int = 1,
    *,
    rows_per_thread: int | None = None,
    reduce_mode: int = 1,
    prefetch: int = 1,
    maxnreg: int = 0,
    fast: int = 1,
    keep_gz: int = 0,
    bc_f32: int = 0,
    pf_next: int = 0,
    segments: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)`` as v2's ``selective_scan_bwd``
    (absent optional inputs give empty tensors). u, delta, z, dout ``[B, D, L]``; A ``[D, N]``; B, C ``[B, G, N, L]``;
    states ``[B, cdiv(L, block_l) + 1, N, D]`` from the forward; dlast ``[B, D, N]`` or None.

    block_l: steps per saved state (a multiple of bt); bt: steps held by a thread; bd: channels per program
    (a power of two dividing D / G, a multiple of 32 num_warps on the GPU). rows_per_thread: the channel rows a
    thread holds, bd / (32 num_warps) by default (only the order of channels within a block depends on it).
    reduce_mode: 1 sums dB / dC over channels by recursive halving across lanes (where bd / rows_per_thread is a
    multiple of 32 and not float64 on the GPU), 0 by tl.sum. prefetch: 1 loads each state's operands one iteration
    of the state loop ahead (2: only the [BD] rows, the B / C rows load at the top of the
    state's iteration). maxnreg: a register cap for the compiler (0: none; GPU only). fast: 1 uses
    approximate PTX ex2 / rcp (float32 on the GPU; the interpreter runs tl.exp2 / tl.sigmoid). In float32 softplus
    is a polynomial (one exp, no log or division) either way; float64 keeps the exact forms. keep_gz: 1 keeps
    dout silu'(z) live across the state loop (dz = it * y) instead of reloading dout and z after it. The block's
    tiles fit the registers without spills on sm_90 where block_l * rows_per_thread <= 16.
    bc_f32: 1 passes float32 copies of B and C to the kernel (no bf16 unpacking in the state loop; twice the bytes).
    pf_next: 1 (GPU only) prefetches the next block's rows of u, delta, dout and z into L1
    (H100: 13.4 ms fwd+bwd against 12.7 without, so off by default). segments: the kernel splits the
    blocks into this many segments run in parallel (more programs for few long sequences), each started from the
    adjoint carried in from the segment after it (``segment_carries``: a light reverse pass over segments 1 .. S - 1
    first)."""
    bsz, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    sd = state_dtype(u)
    nc = states.shape[1] - 1
    if block_l % bt or nc != triton.cdiv(length, block_l):
        raise ValueError(f"seq_bwd: block_l {block_l} must be a multiple of bt {bt} and match states ({nc} blocks)")
    if (dim // groups) % bd:
        raise ValueError(f"seq_bwd: bd {bd} must divide the {dim // groups} channels of a group")
    rows = rows_per_thread or max(1, bd // (32 * num_warps))
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1" or not u.is_cuda
    # dB / dC by recursive halving: warps of 32 full rows; float32 only on the GPU (32-bit shuffles). The shuffles
    # assume a tile row in one lane, which Triton's layout gives when a thread's bt steps of u are <= 16 bytes
    halve = int(
        reduce_mode == 1
        and bt <= 8
        and (bd // rows) % 32 == 0
        and (interp or (sd == torch.float32 and bt * u.element_size() <= 16))
    )
    if bd % rows:
        raise ValueError(f"seq_bwd: rows_per_thread {rows} must divide bd {bd}")
    dout = dout.contiguous()
    seg_blocks = triton.cdiv(nc, max(1, segments))
    n_seg = triton.cdiv(nc, seg_blocks)
    buf = bwd_buffers(u, delta, z, B, C, n, segments=n_seg)
    carry_bd = 32
    while (dim // groups) % carry_bd:
        carry_bd //= 2
    fast_math = bool(fast and not interp and sd == torch.float32)
    gq = segment_carries(
        u, delta, A, C, z, delta_bias, dout, dlast, delta_softplus, seg_blocks * block_l, n_seg, carry_bd, bt, fast_math
    )
    b_dtype, c_dtype = B.dtype, C.dtype
    if bc_f32 and sd == torch.float32:  # [B, G, N, L] is small: float32 copies save the per-state bf16 unpacking
        B, C = B.float(), C.float()
    seq_bwd_so_kernel[(dim // bd, bsz, n_seg)](
        *bwd_launch_args(u, delta, A, B, C, D, z, delta_bias, states, gq, dout, buf),
        BD=bd,
        BT=bt,
        BLOCK_L=block_l,
        R=rows,
        HALVE=halve,
        PREFETCH=prefetch,
        FAST=int(fast_math),
        KEEP_GZ=keep_gz,
        INTERP=interp,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        FP64=sd == torch.float64,
        num_warps=num_warps,
        **({"maxnreg": maxnreg} if maxnreg and not interp else {}),
        PF_NEXT=int(pf_next and not interp),
        SEG_BLOCKS=seg_blocks,
        SEGMENTED=int(n_seg > 1),
    )
    dh0 = gq[0].transpose(1, 2).contiguous()  # a_0 g_0 of the first segment
    return bwd_outputs(buf, u, A, b_dtype, c_dtype, D, delta_bias, dh0)


def _gpu_main() -> None:
    """GPU check + timing: ``python -m mixlab.ops.selective_scan.triton.seq_bwd --out DIR [--configs ...]``.

    Check: every config at B2 T300 D512 N16 (2 groups) in float32 against v2's backward in float64, plus a float64
    run of v3 itself (first config; ``--fp64 all``: every one); timing: bf16 at B32 T2048 D4096 N16 (z, D, bias + softplus) vs v2's default backward.
    Writes ``DIR/seq-bwd.json``."""
    import argparse
    import json
    import pathlib
    import time

    from .op import default_config, selective_scan_bwd, selective_scan_fwd

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--configs",
        default="16,8,64,2,0,1,2;16,8,32,1,0,1,2;16,8,64,2,0,0,2;16,8,64,2,0,1,1",
        help="';'-separated block_l,bt,bd,num_warps[,maxnreg[,reduce_mode[,prefetch[,fast[,keep_gz[,bc_f32"
        "[,pf_next[,segments]]]]]]]]",
    )
    ap.add_argument("--shape", default="32,2048,4096,16", help="timing shape B,T,D,N (bf16, one group)")
    ap.add_argument("--check-shape", default="2,300,512,16", help="check shape B,T,D,N (two groups)")
    ap.add_argument("--fp64", default="first", choices=("first", "all"), help="configs also checked in float64")
    args = ap.parse_args()
    cfgs = [[int(x) for x in c.split(",")] for c in args.configs.split(";") if c]

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1

    def bench(fn):
        if dev == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def inputs(bsz, length, dim, n, groups, dtype, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

        a = -(torch.rand(dim, n, generator=g, device=dev) * 2 + 0.1)
        return dict(
            u=r(bsz, dim, length),
            delta=r(bsz, dim, length, scale=0.5),
            A=a.to(torch.float64 if dtype == torch.float64 else torch.float32),
            B=r(bsz, groups, n, length),
            C=r(bsz, groups, n, length),
            D=r(dim),
            z=r(bsz, dim, length),
            delta_bias=r(dim, scale=0.5),
        )

    def states_for(ins, block_l, h0=None):
        bl_f = max(1, 1024 // block_l)
        cfg = [block_l, bl_f, 4 if bl_f * block_l >= 1024 else 1, 4, 1]
        args5 = [ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        return selective_scan_fwd(*args5, h0, True, cfg)

    def v3(ins, states, dout, dlast, c):
        kw = dict(
            zip(("maxnreg", "reduce_mode", "prefetch", "fast", "keep_gz", "bc_f32", "pf_next", "segments"), c[4:])
        )
        args5 = [ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        return seq_bwd(*args5, states, dout, dlast, True, c[0], c[1], c[2], c[3], **kw)

    def rel(x, ref):
        return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()

    res = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "triton": triton.__version__,
        "check": [],
        "time": [],
    }
    # check vs v2 in float64
    cb, cl, cd, cn = (int(x) for x in args.check_shape.split(","))
    ck = inputs(cb, cl, cd, cn, 2, torch.float64, seed=1)
    h0 = torch.randn(cb, cd, cn, device=dev, dtype=torch.float64)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dh0")
    for c in cfgs:
        _, last, st64 = states_for(ck, c[0], h0)
        dout = torch.randn_like(ck["u"])
        dlast = torch.randn_like(last)
        args5 = [ck[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        ref = selective_scan_bwd(*args5, st64, dout, dlast, True, [c[0], 8, 1, 8, 1])
        ck32 = {k: v.float() for k, v in ck.items()}
        got32 = v3(ck32, st64.float(), dout.float(), dlast.float(), c)
        entry = {
            "config": c,
            "fp32_vs_v2_fp64": {k: rel(a, b) for k, a, b in zip(names, got32, ref)},
        }
        if args.fp64 == "all" or c is cfgs[0]:  # v3 itself in float64 (tl.sum channel sums, exact exp / softplus)
            got64 = v3(ck, st64, dout, dlast, c)
            entry["fp64_vs_v2"] = {k: rel(a, b) for k, a, b in zip(names, got64, ref)}
        res["check"].append(entry)
        print("check", c, max(res["check"][-1]["fp32_vs_v2_fp64"].values()), flush=True)
    # timing, bf16
    bsz, length, dim, n = (int(x) for x in args.shape.split(","))
    ins = inputs(bsz, length, dim, n, 1, torch.bfloat16, seed=2)
    dout = torch.randn_like(ins["u"])
    dlast = torch.randn(bsz, dim, n, device=dev)
    v2cfg = default_config(dim, length, 1)
    _, _, st = states_for(ins, v2cfg[0])
    args5 = [ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    ms = bench(lambda: selective_scan_bwd(*args5, st, dout, dlast, True, v2cfg))
    res["time"].append({"kernel": "v2", "config": v2cfg, "ms": ms})
    print("v2", v2cfg, ms, flush=True)
    for c in cfgs:
        _, _, st = states_for(ins, c[0])
        t0 = time.time()
        try:
            ms = bench(lambda st=st, c=c: v3(ins, st, dout, dlast, c))
        except Exception as e:  # a config that does not compile must not end the sweep
            ms = None
            res["time"].append({"kernel": "v3", "config": c, "error": repr(e)[:500]})
        else:
            res["time"].append({"kernel": "v3", "config": c, "ms": ms, "wall_s": time.time() - t0})
        print("v3", c, ms, flush=True)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / "seq-bwd.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    _gpu_main()
