"""Triton kernels of Mamba's selective scan (forward, backward) and its one-token decode step.

Work split (both passes): one program per (batch, block of ``BD`` channels); it walks the sequence in
chunks of ``BL`` time steps and, inside a chunk, loops over the states n. For each n it forms
``a = exp(delta A_n)`` and ``b = delta u B_n`` as ``[BD, BL]`` tiles and scans them over time with
``tl.associative_scan`` (Triton keeps 8 consecutive steps in each thread and scans across lanes),
then adds the state carried in from the previous chunk.

The carried states go through a float32 buffer ``[B, n_chunks + 1, N, D]`` instead of registers: the
forward reads chunk c's start states from slot c and writes the end states to slot c + 1 (a masked
store from the one lane that holds the last step), with a barrier between chunks. Slot 0 is the
initial state, the last slot the final state, and the backward reads the chunk starts from it.

Backward, per chunk in reverse order: recompute ``h`` by the forward scan, then the adjoint
``g_t = dy_t C_t + a_{t+1} g_{t+1}`` by a reverse scan (``a_{t+1}`` comes from delta loaded one step
ahead, so no register shift is needed); ``a_t h_{t-1} = h_t - b_t`` gives the decay term. The
adjoint carried between chunks lives in a two-slot buffer ``[B, 2, N, D]`` (ping-pong). dB and dC are
sums over the channels of a group: each program reduces its block and adds it with an atomic to a
float32 ``[B, G, N, L]`` buffer; dA likewise into ``[B, N, D]``.

All arithmetic is float32 (float64 when the inputs are float64, which keeps the CPU interpreter
tests tight). ``exp`` is ``exp2`` on ``A log2(e)`` in float32 mode.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scan_combine(a1, b1, a2, b2):
    # (a1, b1) precedes (a2, b2) in scan order: h -> a2 (a1 h + b1) + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with mamba_ssm's threshold (identity above 20); log1p via w = 1 + e,
    # log(w) * e / (w - 1), accurate where 1 + e rounds (Goldberg's trick).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    dw = w - 1.0
    lp = tl.where(dw == 0.0, e, tl.log(w) * (e / tl.where(dw == 0.0, 1.0, dw)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _decay(dl, a_row, FP64: tl.constexpr):
    # exp(dl * A) for a [BD, BL] tile and a [BD] row of A (pre-scaled by log2(e) in float32 mode).
    if FP64:
        return tl.exp(dl * a_row[:, None])
    else:
        return tl.exp2(dl * a_row[:, None])


@triton.jit
def _load_delta(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CT: tl.constexpr):
    """Returns (delta after bias/softplus, pre-softplus value), zero where masked."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(CT)
    if HAS_BIAS:
        raw = raw + tl.load(bias_ptr + d).to(CT)[:, None]
    dl = raw
    if SOFTPLUS:
        dl = _softplus(raw)
    dl = tl.where(mask, dl, 0.0)
    return dl, raw


@triton.jit
def _state_loads(A_ptr, B_base, C_base, st_ptr, d, t2, m2, n, N, DIM, stride_bn, stride_cn):
    """State n's operands: A[d, n] [BD], B and C rows as [BD, BL] tiles (each row repeated), state at d [BD]."""
    a = tl.load(A_ptr + d * N + n)
    Bn = tl.load(B_base + n * stride_bn + t2, mask=m2, other=0.0)
    Cn = tl.load(C_base + n * stride_cn + t2, mask=m2, other=0.0)
    h = tl.load(st_ptr + n * DIM)
    return a, Bn, Cn, h


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    hchunk_ptr,
    out_ptr,
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
    BD: tl.constexpr,
    BL: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
    FOLD: tl.constexpr = 0,
):
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    grp = (pid_d * BD) // CH_PER_GROUP
    tt = tl.arange(0, BL)
    row = (b * DIM + d).to(tl.int64) * L  # [BD] offsets of each channel's sequence in u/delta/z/out
    last = (tt == BL - 1)[None, :]
    if HAS_D:
        Dv = tl.load(D_ptr + d).to(CT)
    B_base = B_ptr + b * stride_bb + grp * stride_bg
    C_base = C_ptr + b * stride_cb + grp * stride_cg
    for c in range(0, N_CHUNKS):
        t = c * BL + tt
        tmask = t < L
        mask = tmask[None, :]
        offs = row[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
        dl, _ = _load_delta(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS, SOFTPLUS, CT)
        du = dl * u
        y = tl.zeros([BD, BL], dtype=CT)
        st_in = hchunk_ptr + (b * (N_CHUNKS + 1) + c) * N * DIM + d  # slot c, state n at + n * DIM
        t2 = t[None, :] + 0 * d[:, None]  # B/C rows broadcast over the block: loaded in the tile's own layout
        m2 = t2 < L
        a_nx, B_nx, C_nx, h_nx = _state_loads(A_ptr, B_base, C_base, st_in, d, t2, m2, 0, N, DIM, stride_bn, stride_cn)
        for n in range(0, N):
            # this state's operands were loaded one iteration ahead; start the next state's loads now
            a_row, Bn, Cn, h_in = a_nx, B_nx, C_nx, h_nx
            a_nx, B_nx, C_nx, h_nx = _state_loads(
                A_ptr, B_base, C_base, st_in, d, t2, m2, tl.minimum(n + 1, N - 1), N, DIM, stride_bn, stride_cn
            )
            a_row = a_row.to(CT)
            if not FP64:
                a_row = a_row * LOG2E
            a = _decay(dl, a_row, FP64)
            bb = du * Bn.to(CT)
            if FOLD:
                # the carried state enters as a_0 h_in added to b_0: the scan's product output is dead code
                first = tt[None, :] == 0
                _, h = tl.associative_scan((a, bb + tl.where(first, a * h_in.to(CT)[:, None], 0.0)), 1, _scan_combine)
            else:
                P, S = tl.associative_scan((a, bb), 1, _scan_combine)
                h = S + P * h_in.to(CT)[:, None]
            y += h * Cn.to(CT)
            # end state -> slot c + 1 (masked steps have a = 1, b = 0, so the chunk's last column is it)
            tl.store((st_in + (N + n) * DIM)[:, None] + 0 * tt[None, :], h.to(hchunk_ptr.dtype.element_ty), mask=last)
        # the next chunk's start states were written by other threads
        tl.debug_barrier()
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CT)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_state(
    n, a_nat, Bn, Cn, h_in, g_in, u, dl, dl_next, dy, y, du_acc, ddl,
    g_out_ptr, dA_row, dB_base, dC_base, t, tmask, t2, m2, first, tt,
    DIM, stride_dbn, stride_dcn, RED_TILE: tl.constexpr, FOLD: tl.constexpr, FP64: tl.constexpr, CT: tl.constexpr,
):  # fmt: skip
    """One state n of one backward chunk: recompute h, reverse-scan the adjoint g, accumulate y, du, ddelta
    ([BD, BL]) and add dA, dB, dC with atomics. Returns (y, du_acc, ddl)."""
    a_nat = a_nat.to(CT)
    Bn = Bn.to(CT)
    Cn = Cn.to(CT)
    a_row = a_nat
    if not FP64:
        a_row = a_nat * LOG2E
    # forward recompute of this chunk's states
    a = _decay(dl, a_row, FP64)
    uB = u * Bn
    bb = dl * uB
    if FOLD:
        # the carried state enters as a_0 h_in added to b_0, so the scan's product output is unused (dead code)
        _, h = tl.associative_scan(
            (a, bb + tl.where(tt[None, :] == 0, a * h_in.to(CT)[:, None], 0.0)), 1, _scan_combine
        )
    else:
        P, S = tl.associative_scan((a, bb), 1, _scan_combine)
        h = S + P * h_in.to(CT)[:, None]
    y += h * Cn
    # adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}
    alpha = _decay(dl_next, a_row, FP64)
    cc = dy * Cn
    if FOLD:
        last = tt[None, :] == tt.shape[0] - 1
        _, g = tl.associative_scan(
            (alpha, cc + tl.where(last, alpha * g_in.to(CT)[:, None], 0.0)), 1, _scan_combine, reverse=True
        )
    else:
        Q, R = tl.associative_scan((alpha, cc), 1, _scan_combine, reverse=True)
        g = R + Q * g_in.to(CT)[:, None]
    tl.store((g_out_ptr + n * DIM)[:, None] + 0 * tt[None, :], g.to(g_out_ptr.dtype.element_ty), mask=first)
    hb = h - bb  # a_t h_{t-1}
    gdl = g * dl
    du_acc += gdl * Bn
    ddl += g * (uB + hb * a_nat[:, None])
    # atomics (relaxed: only the sums matter), not load + store: a row can span several warps
    tl.atomic_add(dA_row + n * DIM, tl.sum(gdl * hb, 1), sem="relaxed")
    if RED_TILE == 1:
        tl.atomic_add(dB_base + n * stride_dbn + t2, gdl * u, mask=m2, sem="relaxed")
    else:
        tl.atomic_add(dB_base + n * stride_dbn + t, tl.sum(gdl * u, 0), mask=tmask, sem="relaxed")
    if RED_TILE == 0:
        tl.atomic_add(dC_base + n * stride_dcn + t, tl.sum(dy * h, 0), mask=tmask, sem="relaxed")
    else:
        tl.atomic_add(dC_base + n * stride_dcn + t2, dy * h, mask=m2, sem="relaxed")
    return y, du_acc, ddl


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    hchunk_ptr,
    gbuf_ptr,
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
    BL: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
    NS: tl.constexpr = 1,
    RED_TILE: tl.constexpr = 0,
    FOLD: tl.constexpr = 0,
):
    """NS: states per iteration of the state loop (1, or 2 when N is even). RED_TILE: 0 sums dB/dC over
    the block's channels (cross-lane) before the atomics; 1 adds the [BD, BL] tile with atomics as is; 2 sums
    dB only and adds dC's tile as is. FOLD: 1 adds the carried state / adjoint into the scans' first / last
    input instead of applying the scans' product outputs after them."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    grp = (pid_d * BD) // CH_PER_GROUP
    tt = tl.arange(0, BL)
    row = (b * DIM + d).to(tl.int64) * L
    first = (tt == 0)[None, :]
    dD_acc = tl.zeros([BD], dtype=CT)
    dbias_acc = tl.zeros([BD], dtype=CT)
    if HAS_D:
        Dv = tl.load(D_ptr + d).to(CT)
    B_base = B_ptr + b * stride_bb + grp * stride_bg
    C_base = C_ptr + b * stride_cb + grp * stride_cg
    dB_base = dB_ptr + b * stride_dbb + grp * stride_dbg
    dC_base = dC_ptr + b * stride_dcb + grp * stride_dcg
    dA_row = dA_ptr + b * N * DIM + d  # [B, N, D], state n at + n * DIM
    for ci in range(0, N_CHUNKS):
        c = N_CHUNKS - 1 - ci
        t = c * BL + tt
        tmask = t < L
        mask = tmask[None, :]
        offs = row[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
        dl, _ = _load_delta(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS, SOFTPLUS, CT)
        # delta one step ahead: its decay a_{t+1} carries g_{t+1} back to t; zero (unit decay) at t >= L-1,
        # where the adjoint of the final state enters.
        nmask = (t + 1 < L)[None, :]
        dl_next, _ = _load_delta(delta_ptr, bias_ptr, offs + 1, d, nmask, HAS_BIAS, SOFTPLUS, CT)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(CT)
        if HAS_Z:
            zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CT)
            dy = dout * zz * tl.sigmoid(zz)
        else:
            dy = dout
        # fewer live [BD, BL] tiles across the state loop (occupancy): z, dout and the pre-softplus delta are
        # reloaded after it (from cache) rather than kept, and dl * u is not kept (u B_n is formed per state anyway)
        y = tl.zeros([BD, BL], dtype=CT)
        du_acc = tl.zeros([BD, BL], dtype=CT)
        ddl = tl.zeros([BD, BL], dtype=CT)
        st_in = hchunk_ptr + (b * (N_CHUNKS + 1) + c) * N * DIM + d
        g_in_ptr = gbuf_ptr + (b * 2 + c % 2) * N * DIM + d  # adjoint at the next chunk's first step
        g_out_ptr = gbuf_ptr + (b * 2 + (c + 1) % 2) * N * DIM + d
        t2 = t[None, :] + 0 * d[:, None]  # B/C rows broadcast over the block: loaded in the tile's own layout
        m2 = t2 < L
        a_nx, B_nx, C_nx, h_nx = _state_loads(A_ptr, B_base, C_base, st_in, d, t2, m2, 0, N, DIM, stride_bn, stride_cn)
        g_nx = tl.load(g_in_ptr)
        if NS == 2:
            a_nx1, B_nx1, C_nx1, h_nx1 = _state_loads(
                A_ptr, B_base, C_base, st_in, d, t2, m2, 1, N, DIM, stride_bn, stride_cn
            )
            g_nx1 = tl.load(g_in_ptr + DIM)
        for n in range(0, N, NS):
            # this iteration's operands were loaded one iteration ahead; start the next iteration's loads now
            a_0, B_0, C_0, h_0, g_0 = a_nx, B_nx, C_nx, h_nx, g_nx
            n1 = tl.minimum(n + NS, N - NS)
            a_nx, B_nx, C_nx, h_nx = _state_loads(
                A_ptr, B_base, C_base, st_in, d, t2, m2, n1, N, DIM, stride_bn, stride_cn
            )
            g_nx = tl.load(g_in_ptr + n1 * DIM)
            if NS == 2:
                # a second, independent state per iteration: its two scans interleave with the first's (ILP)
                a_1, B_1, C_1, h_1, g_1 = a_nx1, B_nx1, C_nx1, h_nx1, g_nx1
                a_nx1, B_nx1, C_nx1, h_nx1 = _state_loads(
                    A_ptr, B_base, C_base, st_in, d, t2, m2, n1 + 1, N, DIM, stride_bn, stride_cn
                )
                g_nx1 = tl.load(g_in_ptr + (n1 + 1) * DIM)
            y, du_acc, ddl = _bwd_state(
                n, a_0, B_0, C_0, h_0, g_0, u, dl, dl_next, dy, y, du_acc, ddl,
                g_out_ptr, dA_row, dB_base, dC_base, t, tmask, t2, m2, first, tt,
                DIM, stride_dbn, stride_dcn, RED_TILE, FOLD, FP64, CT,
            )  # fmt: skip
            if NS == 2:
                y, du_acc, ddl = _bwd_state(
                    n + 1, a_1, B_1, C_1, h_1, g_1, u, dl, dl_next, dy, y, du_acc, ddl,
                    g_out_ptr, dA_row, dB_base, dC_base, t, tmask, t2, m2, first, tt,
                    DIM, stride_dbn, stride_dcn, RED_TILE, FOLD, FP64, CT,
                )  # fmt: skip
        # the adjoint slot written above is read by other threads in the next chunk
        tl.debug_barrier()
        if HAS_D:
            y += Dv[:, None] * u
            du_acc += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, 1)
        if HAS_Z:
            dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(CT)
            zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(CT)
            sz = tl.sigmoid(zz)
            dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            _, raw = _load_delta(delta_ptr, bias_ptr, offs, d, mask, HAS_BIAS, False, CT)
            ddl = ddl * tl.sigmoid(raw)
        ddl = tl.where(mask, ddl, 0.0)
        dbias_acc += tl.sum(ddl, 1)
        tl.store(du_ptr + offs, du_acc.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddl.to(ddelta_ptr.dtype.element_ty), mask=mask)
    part = b * DIM + d
    tl.store(dD_part_ptr + part, dD_acc.to(dD_part_ptr.dtype.element_ty))
    tl.store(dbias_part_ptr + part, dbias_acc.to(dbias_part_ptr.dtype.element_ty))


@triton.jit
def selective_state_update_kernel(
    state_ptr,
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    DIM,
    N,
    CH_PER_GROUP,
    stride_bb,
    stride_bg,
    stride_cb,
    stride_cg,
    NP: tl.constexpr,
    BD: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
):
    """One decode step, state updated in place: ``h = exp(dt A) h + dt B x``; ``y = C.h + D x``; ``y *= silu(z)``."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < DIM
    nn = tl.arange(0, NP)
    m2 = dmask[:, None] & (nn[None, :] < N)
    grp = d // CH_PER_GROUP
    st_offs = (b * DIM + d).to(tl.int64)[:, None] * N + nn[None, :]
    h = tl.load(state_ptr + st_offs, mask=m2, other=0.0).to(CT)
    x = tl.load(x_ptr + b * DIM + d, mask=dmask, other=0.0).to(CT)
    dt = tl.load(dt_ptr + b * DIM + d, mask=dmask, other=0.0).to(CT)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(CT)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + d[:, None] * N + nn[None, :], mask=m2, other=0.0).to(CT)
    Bv = tl.load(B_ptr + b * stride_bb + grp[:, None] * stride_bg + nn[None, :], mask=m2, other=0.0).to(CT)
    Cv = tl.load(C_ptr + b * stride_cb + grp[:, None] * stride_cg + nn[None, :], mask=m2, other=0.0).to(CT)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv
    tl.store(state_ptr + st_offs, h.to(state_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv, 1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=dmask, other=0.0).to(CT) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * DIM + d, mask=dmask, other=0.0).to(CT)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + b * DIM + d, y.to(out_ptr.dtype.element_ty), mask=dmask)
