"""Triton causal depthwise convolution: forward, backward and the one-token decode update.

Same contract as :func:`mixlab.ops.conv.reference.causal_conv1d`: x ``[B, T, C]`` (channels last, any
strides with unit channel stride), weight ``[C, W]``, the state ``[B, C, W-1]`` holds the W-1 inputs
before the sequence. Write ``xp = cat(initial_state, x)`` along time (length T+W-1); then
``pre[t] = bias + sum_k w[k] xp[t+k]``, ``y = act(pre)`` and ``final_state = xp[T:]``.

Backward: ``dpre = dy * act'(pre)`` and ``dx[s] = sum_i w[i] dpre[s + W-1 - i]`` (plus d(final_state) on
the last W-1 rows of xp; rows of xp below W-1 give d(initial_state)). In both directions one program owns a
``[BC]`` channel vector and a run of time rows; it walks the rows in order, loading x[t] (and dy[t]) once,
computing pre[t] (and dpre[t]) once, and keeping the last W-1 rows of x (and dpre) in registers (a ring), so
the forward reads x once and writes y once, the backward reads x and dy once and writes dx once. dweight and
dbias are per-program partial sums (deterministic), added up at the end. Widths up to 4: the ring entries are
named explicitly.
Arithmetic is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton", "default_config"]


@triton.jit
def _lag(j: tl.constexpr, v0, v1, v2, v3):
    """The ring entry j rows back in time (j = 0: the current row)."""
    if j == 0:
        r = v0
    elif j == 1:
        r = v1
    elif j == 2:
        r = v2
    else:
        r = v3
    return r


@triton.jit
def _bwd_row(
    xv, gv, x1, x2, x3, d1, d2, d3, w0, w1, w2, w3, bias, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr
):
    """Row t: xv = x[t], gv = dy[t], x1..x3 = x[t-1..t-3], d1..d3 = dpre[t-1..t-3] (all [BC]).

    Returns (dpre[t], dx[t - (W-1)] without the final-state term, act(pre[t])); tap k pairs with x[t - (W-1) + k].
    """
    pre = w0 * _lag(W - 1, xv, x1, x2, x3) + w1 * _lag(W - 2, xv, x1, x2, x3)
    if W > 2:
        pre += w2 * _lag(W - 3, xv, x1, x2, x3)
    if W > 3:
        pre += w3 * xv
    if HAS_BIAS:
        pre += bias
    dpre = gv
    act = pre
    if SILU:
        sg = 1.0 / (1.0 + tl.exp(-pre))
        dpre = gv * sg * (1.0 + pre * (1.0 - sg))
        act = pre * sg
    dxr = w0 * dpre + w1 * d1
    if W > 2:
        dxr += w2 * d2
    if W > 3:
        dxr += w3 * d3
    return dpre, dxr, act


@triton.jit
def _values_in(dv_ptr, do_ptr, d_ptr, Dv, b, t, c, T, C, NH, EVEN_C: tl.constexpr, P: tl.constexpr, CT: tl.constexpr):
    """SSD's values backward for time row t (VALUES): the conv output's gradient ``dv·d + D·dO`` and dv, dO
    (all [BC]); dv / dO ``[B·T, C]``, d ``[B·T, NH]`` (channel c is head c // P)."""
    m = _rows(c, C, t, 0, T, EVEN_C)
    r = (b * T + t).to(tl.int64)
    dvv = tl.load(dv_ptr + r * C + c, mask=m, other=0.0).to(CT)
    dov = tl.load(do_ptr + r * C + c, mask=m, other=0.0).to(CT)
    dd = tl.load(d_ptr + r * NH + c // P, mask=m, other=0.0).to(CT)
    return dvv * dd + Dv * dov, dvv, dov


@triton.jit
def _values_out(
    act, dvv, dov, dD, take, b, t, heads, T, NH, ddx_ptr, x_dtype, P: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Row t's ``Σ_p dv·x`` for the program's heads ``[BC // P]`` into ddx ``[B·T, NH]`` and ``dO·x`` added to dD,
    both only where ``take`` (1.0 or 0.0); x is the conv output rounded to the input dtype, as the SSD read it."""
    xv = act.to(x_dtype).to(act.dtype)
    hs = tl.sum(tl.reshape(dvv * xv, [BC // P, P]), axis=1)
    tv = heads * 0 + t  # vectors: the interpreter rejects a vector mask combined with a scalar one
    tk = tl.zeros([BC // P], dtype=act.dtype) + take
    m = (tv >= 0) & (tv < T) & (heads < NH) & (tk > 0)
    tl.store(ddx_ptr + (b * T + t).to(tl.int64) * NH + heads, hs, mask=m)
    return dD + dov * xv * take


@triton.jit
def _bwd_acc(dpre, xv, x1, x2, x3, dw0, dw1, dw2, dw3, db, W: tl.constexpr):
    """dweight[k] += dpre[t] x[t - (W-1) + k], dbias += dpre[t]."""
    dw0 += dpre * _lag(W - 1, xv, x1, x2, x3)
    dw1 += dpre * _lag(W - 2, xv, x1, x2, x3)
    if W > 2:
        dw2 += dpre * _lag(W - 3, xv, x1, x2, x3)
    if W > 3:
        dw3 += dpre * xv
    return dw0, dw1, dw2, dw3, db + dpre


@triton.jit
def _rows(c, C, t, lo, hi, EVEN_C: tl.constexpr):
    """[BC] mask: lo <= t < hi for the scalar row t, and c < C (built on vectors: the interpreter rejects
    a vector mask combined with a scalar one)."""
    tv = c * 0 + t
    m = (tv >= lo) & (tv < hi)
    if not EVEN_C:
        m = m & (c < C)
    return m


@triton.jit
def _x_row(
    x_ptr,
    h0_ptr,
    b,
    t,
    c,
    C,
    T,
    sxb,
    sxt,
    shb,
    shc,
    W: tl.constexpr,
    HAS_H0: tl.constexpr,
    EVEN_C: tl.constexpr,
    CT: tl.constexpr,
):
    """x[b, t, c] for a scalar t in [-2(W-1), T + W): the initial state for -(W-1) <= t < 0, zero outside."""
    v = tl.load(x_ptr + b * sxb + t.to(tl.int64) * sxt + c, mask=_rows(c, C, t, 0, T, EVEN_C), other=0.0).to(CT)
    if HAS_H0:  # noqa: SIM102 (a compile-time and a run-time condition)
        if t < 0:
            v = tl.load(h0_ptr + b * shb + c * shc + (t + W - 1), mask=_rows(c, C, t, 1 - W, 0, EVEN_C), other=0.0).to(
                CT
            )
    return v


@triton.jit
def _taps(w_ptr, bias_ptr, c, cmask, W: tl.constexpr, HAS_BIAS: tl.constexpr, CT: tl.constexpr):
    """The W <= 4 taps of channels c (weight ``[C, W]``), each ``[BC]``, and the bias (zeros without one); taps past
    W repeat w1 (unused)."""
    w0 = tl.load(w_ptr + c * W + 0, mask=cmask, other=0.0).to(CT)
    w1 = tl.load(w_ptr + c * W + 1, mask=cmask, other=0.0).to(CT)
    w2 = w1
    w3 = w1
    if W > 2:
        w2 = tl.load(w_ptr + c * W + 2, mask=cmask, other=0.0).to(CT)
    if W > 3:
        w3 = tl.load(w_ptr + c * W + 3, mask=cmask, other=0.0).to(CT)
    bias = tl.zeros_like(w0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(CT)
    return w0, w1, w2, w3, bias


@triton.jit
def _ring(x_ptr, h0_ptr, b, s0, c, C, T, sxb, sxt, shb, shc, W: tl.constexpr, HAS_H0: tl.constexpr,
          EVEN_C: tl.constexpr, CT: tl.constexpr):  # fmt: skip
    """The register ring before row s0: ``x[s0 - 1], x[s0 - 2], x[s0 - 3]`` (zeros past W - 1)."""
    x1 = _x_row(x_ptr, h0_ptr, b, s0 - 1, c, C, T, sxb, sxt, shb, shc, W, HAS_H0, EVEN_C, CT)
    x2 = tl.zeros_like(x1)
    x3 = tl.zeros_like(x1)
    if W > 2:
        x2 = _x_row(x_ptr, h0_ptr, b, s0 - 2, c, C, T, sxb, sxt, shb, shc, W, HAS_H0, EVEN_C, CT)
    if W > 3:
        x3 = _x_row(x_ptr, h0_ptr, b, s0 - 3, c, C, T, sxb, sxt, shb, shc, W, HAS_H0, EVEN_C, CT)
    return x1, x2, x3


@triton.jit
def _load_rows(row_ptr, t, st, c, C, T, U: tl.constexpr, EVEN_C: tl.constexpr):
    """Rows t .. t + U - 1 (U <= 4) of a ``[T, C]`` stream (row stride st, zeros past T), issued together; rows past
    U repeat row t (unused)."""
    ra = tl.load(row_ptr + t.to(tl.int64) * st, mask=_rows(c, C, t, 0, T, EVEN_C), other=0.0)
    rb = ra
    rc = ra
    rd = ra
    if U > 1:
        rb = tl.load(row_ptr + (t + 1).to(tl.int64) * st, mask=_rows(c, C, t + 1, 0, T, EVEN_C), other=0.0)
    if U > 2:
        rc = tl.load(row_ptr + (t + 2).to(tl.int64) * st, mask=_rows(c, C, t + 2, 0, T, EVEN_C), other=0.0)
        rd = tl.load(row_ptr + (t + 3).to(tl.int64) * st, mask=_rows(c, C, t + 3, 0, T, EVEN_C), other=0.0)
    return ra, rb, rc, rd


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    h0_ptr,
    y_ptr,
    T,
    C,
    sxb,
    sxt,
    shb,
    shc,
    W: tl.constexpr,
    TL: tl.constexpr,
    BC: tl.constexpr,
    U: tl.constexpr,
    EVEN_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SILU: tl.constexpr,
    FP64: tl.constexpr,
):
    # One program: BC channels (one [BC] vector per time row) and TL consecutive output rows, walked U rows at a
    # time so that their loads are in flight together. Each x row is loaded once; the last W-1 rows stay in
    # registers (a ring), as in _conv_bwd_kernel. y[t] = act(bias + sum_k w[k] x[t - (W-1) + k]), summed in that
    # order.
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < C
    t0 = pid_t * TL
    w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, c, cmask, W, HAS_BIAS, CT)
    # ring of x[t0 - 1], x[t0 - 2], x[t0 - 3] (the initial state below row 0)
    x1, x2, x3 = _ring(x_ptr, h0_ptr, b, t0, c, C, T, sxb, sxt, shb, shc, W, HAS_H0, EVEN_C, CT)
    x_row = x_ptr + b * sxb + c
    y_row = y_ptr + b * T * C + c
    for it in range(TL // U):
        t = t0 + it * U
        xa, xb, xc, xd = _load_rows(x_row, t, sxt, c, C, T, U, EVEN_C)
        for j in tl.static_range(U):
            xv = _lag(j, xa, xb, xc, xd).to(CT)
            acc = tl.zeros([BC], dtype=CT)
            if HAS_BIAS:
                acc += bias
            acc += w0 * _lag(W - 1, xv, x1, x2, x3)
            acc += w1 * _lag(W - 2, xv, x1, x2, x3)
            if W > 2:
                acc += w2 * _lag(W - 3, xv, x1, x2, x3)
            if W > 3:
                acc += w3 * xv
            if SILU:
                acc = acc * tl.sigmoid(acc)
            tl.store(
                y_row + (t + j).to(tl.int64) * C, acc.to(y_ptr.dtype.element_ty), mask=_rows(c, C, t + j, 0, T, EVEN_C)
            )
            x3 = x2
            x2 = x1
            x1 = xv


@triton.jit
def _bwd_out(
    dxr,
    s,
    b,
    c,
    dx_ptr,
    dh0_ptr,
    dfinal_ptr,
    T,
    C,
    sdxb,
    sdxt,
    W: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    """Store row s of dxp = cat(d initial_state, dx) (s in [-(W-1), T)), adding d final_state where it lands."""
    if HAS_DFINAL:  # noqa: SIM102
        if s >= T - (W - 1):
            j = s - T + W - 1
            dxr += tl.load(
                dfinal_ptr + b * (C * (W - 1)) + c * (W - 1) + j, mask=_rows(c, C, j, 0, W - 1, EVEN_C), other=0.0
            ).to(dxr.dtype)
    tl.store(
        dx_ptr + b * sdxb + s.to(tl.int64) * sdxt + c,
        dxr.to(dx_ptr.dtype.element_ty),
        mask=_rows(c, C, s, 0, T, EVEN_C),
    )
    if HAS_H0:  # noqa: SIM102
        if s < 0:
            tl.store(
                dh0_ptr + b * (C * (W - 1)) + c * (W - 1) + (s + W - 1),
                dxr.to(dh0_ptr.dtype.element_ty),
                mask=_rows(c, C, s, 1 - W, 0, EVEN_C),
            )


@triton.jit
def _conv_bwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    h0_ptr,
    dy_ptr,
    dfinal_ptr,
    dx_ptr,
    dh0_ptr,
    dw_part_ptr,
    db_part_ptr,
    dv_ptr,
    d_ptr,
    D_ptr,
    ddx_ptr,
    dD_part_ptr,
    T,
    C,
    sxb,
    sxt,
    shb,
    shc,
    sdyb,
    sdyt,
    sdxb,
    sdxt,
    NH,
    W: tl.constexpr,
    TL: tl.constexpr,
    BC: tl.constexpr,
    U: tl.constexpr,
    EVEN_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    SILU: tl.constexpr,
    FP64: tl.constexpr,
    VALUES: tl.constexpr = False,
    P: tl.constexpr = 1,
    D_PER_P: tl.constexpr = False,
):
    # One program: BC channels (one [BC] vector per time row) and TL output rows s of
    # dxp = cat(d initial_state, dx), s in [-(W-1), T) when there is an initial state, else [0, T).
    # It walks time rows t = s + (W-1) once, in order: x[t] and dy[t] are loaded once, pre[t] / dpre[t]
    # computed once, and the last W-1 rows of x and dpre stay in registers (a ring) for the W taps.
    # Rows below the program's first output are recomputed first (a warm-up of W-1 rows, from cache).
    # VALUES (Mamba2's x channels, no initial state): the conv output feeds SSD as its values ``x·d`` and skip
    # ``D·x``, so its gradient ``dv·d + D·dO`` is formed here from SSD's dv and dO (dy_ptr) and d, and the
    # values' other gradients come out on the way: ``Σ_p dv·x`` per (token, head) into ddx and per-program
    # partials of ``Σ dO·x`` (for dD), instead of a separate pass writing that gradient.
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < C
    if HAS_H0:
        s0 = pid_t * TL - (W - 1)
    else:
        s0 = pid_t * TL
    w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, c, cmask, W, HAS_BIAS, CT)
    zero = tl.zeros([BC], dtype=CT)
    Dv = zero
    heads = tl.arange(0, BC // P)
    if VALUES:
        heads += pid_c * (BC // P)
        if D_PER_P:
            Dv = tl.load(D_ptr + c, mask=cmask, other=0.0).to(CT)
        else:
            Dv = tl.load(D_ptr + c // P, mask=cmask, other=0.0).to(CT)
    dD = zero
    dw0 = zero
    dw1 = zero
    dw2 = zero
    dw3 = zero
    db = zero
    d1 = zero
    d2 = zero
    d3 = zero
    # ring of x[s0 - 1], x[s0 - 2], x[s0 - 3]
    x1, x2, x3 = _ring(x_ptr, h0_ptr, b, s0, c, C, T, sxb, sxt, shb, shc, W, HAS_H0, EVEN_C, CT)
    # warm-up rows t in [s0, s0 + W - 1): dpre only; their dweight terms belong to this program only if it is
    # the first one (the others' warm-up rows are some earlier program's main rows)
    first = (pid_t == 0).to(CT)
    for j in tl.static_range(W - 1):
        t = s0 + j
        xv = _x_row(x_ptr, h0_ptr, b, t, c, C, T, sxb, sxt, shb, shc, W, HAS_H0, EVEN_C, CT)
        if VALUES:
            gv, dvv, dov = _values_in(dv_ptr, dy_ptr, d_ptr, Dv, b, t, c, T, C, NH, EVEN_C, P, CT)
        else:
            gv = tl.load(dy_ptr + b * sdyb + t.to(tl.int64) * sdyt + c, mask=_rows(c, C, t, 0, T, EVEN_C), other=0.0)
            gv = gv.to(CT)
        dpre, _, act = _bwd_row(xv, gv, x1, x2, x3, d1, d2, d3, w0, w1, w2, w3, bias, W, HAS_BIAS, SILU)
        dw0, dw1, dw2, dw3, db = _bwd_acc(dpre * first, xv, x1, x2, x3, dw0, dw1, dw2, dw3, db, W)
        if VALUES:  # a warm-up row is some earlier program's main row, except in the first program
            dD = _values_out(act, dvv, dov, dD, first, b, t, heads, T, NH, ddx_ptr, x_ptr.dtype.element_ty, P, BC)
        x3 = x2
        x2 = x1
        x1 = xv
        d3 = d2
        d2 = d1
        d1 = dpre
    # main rows t = s + W - 1 >= 0, U at a time so that their loads are in flight together
    x_row = x_ptr + b * sxb + c
    dy_row = dy_ptr + b * sdyb + c
    for it in range(TL // U):
        t = s0 + (W - 1) + it * U
        xa, xb, xc, xd = _load_rows(x_row, t, sxt, c, C, T, U, EVEN_C)
        if VALUES:  # the U rows' SSD gradients, loaded before this step's stores (which the compiler cannot pass)
            ga, dva, doa = _values_in(dv_ptr, dy_ptr, d_ptr, Dv, b, t, c, T, C, NH, EVEN_C, P, CT)
            gb, dvb, dob = ga, dva, doa
            gc, dvc, doc = ga, dva, doa
            gd, dvd, dod = ga, dva, doa
            if U > 1:
                gb, dvb, dob = _values_in(dv_ptr, dy_ptr, d_ptr, Dv, b, t + 1, c, T, C, NH, EVEN_C, P, CT)
            if U > 2:
                gc, dvc, doc = _values_in(dv_ptr, dy_ptr, d_ptr, Dv, b, t + 2, c, T, C, NH, EVEN_C, P, CT)
                gd, dvd, dod = _values_in(dv_ptr, dy_ptr, d_ptr, Dv, b, t + 3, c, T, C, NH, EVEN_C, P, CT)
        else:
            ga, gb, gc, gd = _load_rows(dy_row, t, sdyt, c, C, T, U, EVEN_C)
        for j in tl.static_range(U):
            xv = _lag(j, xa, xb, xc, xd).to(CT)
            gv = _lag(j, ga, gb, gc, gd).to(CT)
            if VALUES:
                dvv = _lag(j, dva, dvb, dvc, dvd)
                dov = _lag(j, doa, dob, doc, dod)
            dpre, dxr, act = _bwd_row(xv, gv, x1, x2, x3, d1, d2, d3, w0, w1, w2, w3, bias, W, HAS_BIAS, SILU)
            dw0, dw1, dw2, dw3, db = _bwd_acc(dpre, xv, x1, x2, x3, dw0, dw1, dw2, dw3, db, W)
            if VALUES:
                one = tl.full([], 1.0, CT)
                dD = _values_out(act, dvv, dov, dD, one, b, t + j, heads, T, NH, ddx_ptr, x_ptr.dtype.element_ty, P, BC)
            _bwd_out(
                dxr, t + j - (W - 1), b, c, dx_ptr, dh0_ptr, dfinal_ptr, T, C, sdxb, sdxt, W, HAS_H0, HAS_DFINAL, EVEN_C
            )
            x3 = x2
            x2 = x1
            x1 = xv
            d3 = d2
            d2 = d1
            d1 = dpre
    part = ((b * tl.num_programs(0) + pid_t) * C + c).to(tl.int64)
    tl.store(db_part_ptr + part, db, mask=cmask)
    if VALUES:
        tl.store(dD_part_ptr + part, dD, mask=cmask)
    tl.store(dw_part_ptr + part * W + 0, dw0, mask=cmask)
    tl.store(dw_part_ptr + part * W + 1, dw1, mask=cmask)
    if W > 2:
        tl.store(dw_part_ptr + part * W + 2, dw2, mask=cmask)
    if W > 3:
        tl.store(dw_part_ptr + part * W + 3, dw3, mask=cmask)


@triton.jit
def _conv_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    C,
    W: tl.constexpr,
    WP: tl.constexpr,
    BC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    FP64: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < C
    kk = tl.arange(0, WP)
    st = state_ptr + b * C * (W - 1) + c[:, None] * (W - 1)
    x = tl.load(x_ptr + b * C + c, mask=cmask, other=0.0)
    # window [state[0], ..., state[W-2], x]: column k < W-1 from the state, k == W-1 is x
    win = tl.load(st + kk[None, :], mask=cmask[:, None] & (kk[None, :] < W - 1), other=0.0)
    win = tl.where(kk[None, :] == W - 1, x[:, None].to(win.dtype), win)
    w = tl.load(w_ptr + c[:, None] * W + kk[None, :], mask=cmask[:, None] & (kk[None, :] < W), other=0.0).to(CT)
    acc = tl.sum(win.to(CT) * w, 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(CT)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * C + c, acc.to(y_ptr.dtype.element_ty), mask=cmask)
    # new state = window[1:]: column k takes window column k + 1
    shifted = tl.sum(tl.where(kk[None, :, None] == kk[None, None, :] + 1, win[:, :, None], 0.0), 1)
    tl.store(st + kk[None, :], shifted.to(state_ptr.dtype.element_ty), mask=cmask[:, None] & (kk[None, :] < W - 1))


def default_config(T: int, C: int) -> list[int]:
    """``[fwd_rows, fwd_channels, fwd_warps, bwd_rows, bwd_channels, bwd_warps, bwd_unroll]``.

    Both walk time rows: ``channels`` (a ``[BC]`` vector per time row, 4 elements a thread at the default) and
    ``rows`` consecutive time rows per program, the forward 4 rows at a time, the backward ``bwd_unroll``.
    Chosen from H100 sweeps (benchmarks/NOTES-mamba-kernels.md).
    """
    bc = min(512, triton.next_power_of_2(C))
    rows = min(128, max(4, triton.next_power_of_2(T)))
    # few channels: shorter backward programs, more of them (Mamba2's B and C channels, 256 at the 1.3b width)
    tl_b = min(256 if C > 512 else 64, max(4, triton.next_power_of_2(T + 3)))
    nw = max(1, min(4, bc // 128))
    return [rows, bc, nw, tl_b, bc, nw, 4]


def bwd_variants(T: int, C: int) -> list[list[int]]:
    """Backward launch configs worth comparing on a device (the benchmark's sweep table)."""
    base = default_config(T, C)[:3]
    # sm_90 cross-compile (bf16, W4, bias + SiLU): registers, elements a thread, ~42 instructions an element
    return [
        [*base, 256, 512, 4, 4],  # 122 regs: 4 channels a thread (8-byte loads), 4 rows in flight, 16 warps/SM
        [*base, 256, 512, 4, 2],  # 96 regs: 2 rows in flight, 20 warps/SM
        [*base, 256, 1024, 4, 2],  # 203 regs: 8 channels a thread (16-byte loads), 8 warps/SM
        [*base, 128, 256, 4, 4],  # 72 regs: 2 channels a thread, 28 warps/SM, shorter programs
    ]


@torch.library.custom_op("mixlab::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, silu: bool, config: list[int]
) -> tuple[Tensor, Tensor]:
    """x ``[B, T, C]`` (unit channel stride), weight ``[C, W]`` contiguous. Returns ``(y, final_state)``."""
    bsz, T, C = x.shape
    W = weight.shape[1]
    y = torch.empty(bsz, T, C, device=x.device, dtype=x.dtype)
    rows, bc, nw = config[:3]
    unroll = 4 if rows % 4 == 0 else 2 if rows % 2 == 0 else 1  # rows a step (the kernel names up to 4)
    h0 = initial_state
    grid = (triton.cdiv(T, rows), triton.cdiv(C, bc), bsz)
    _conv_fwd_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        h0 if h0 is not None else x,
        y,
        T,
        C,
        x.stride(0),
        x.stride(1),
        h0.stride(0) if h0 is not None else 0,
        h0.stride(1) if h0 is not None else 0,
        W=W,
        TL=rows,
        BC=bc,
        U=unroll,
        EVEN_C=C % bc == 0,
        HAS_BIAS=bias is not None,
        HAS_H0=h0 is not None,
        SILU=silu,
        FP64=x.dtype == torch.float64,
        num_warps=nw,
    )
    prev = h0.to(x.dtype) if h0 is not None else x.new_zeros(bsz, C, W - 1)
    final = torch.cat([prev, x[:, max(T - (W - 1), 0) :].transpose(1, 2)], dim=2)[:, :, -(W - 1) :].contiguous()
    return y, final


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, silu, config):
    bsz, T, C = x.shape
    return x.new_empty(bsz, T, C), x.new_empty(bsz, C, weight.shape[1] - 1)


@torch.library.custom_op("mixlab::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    dy: Tensor,
    dfinal: Tensor | None,
    silu: bool,
    config: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias, dinitial_state)`` (empty tensors for absent bias / initial state)."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return (dx, *causal_conv1d_bwd_into(x, weight, bias, initial_state, dy, dfinal, silu, config, dx))


def causal_conv1d_bwd_into(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    dy: Tensor,
    dfinal: Tensor | None,
    silu: bool,
    config: list[int],
    dx: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`causal_conv1d_bwd` writing dx into a given ``[B, T, C]`` tensor (any strides with unit channel
    stride, e.g. a slice of a wider gradient buffer); returns ``(dweight, dbias, dinitial_state)``. Channels
    are independent, so a caller may run channel ranges as separate calls."""
    if dy.stride(2) != 1:
        dy = dy.contiguous()
    dw, db, dh0, _ = _bwd_launch(x, weight, bias, initial_state, dy, dfinal, silu, config, dx)
    return dw, db, dh0


#: rows in flight per step (``bwd_unroll``) of the backward with SSD's values folded in, where it divides the rows per
#: program. H100, Mamba2 1.3b x channels (B8 T4096, 4096 of 8512 channels; results/norm-conv-values-…-s11.json):
#: 4 rows 0.70 ms, 2 rows 0.57, 1 row 0.61 (256 rows × 512 channels, 4 warps), against 0.37 for the plain conv
#: backward plus ≈ 0.45 for the values pass it replaces
VALUES_BWD_UNROLL = 2


def values_fold_fits(head_dim: int, config: list[int]) -> bool:
    """Whether :func:`causal_conv1d_bwd_values_into` takes heads of ``head_dim`` channels at this launch config:
    a power of two that divides the backward's channel tile ``config[4]``."""
    return head_dim > 0 and head_dim & (head_dim - 1) == 0 and config[4] % head_dim == 0


def causal_conv1d_bwd_values_into(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    dv: Tensor,
    do: Tensor,
    d: Tensor,
    D: Tensor,
    config: list[int],
    dx: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``silu(conv(x))`` where that output ``xc [B, T, H·P]`` is SSD's input: its values ``xc·d`` and its
    skip ``D·xc`` (Mamba2's x channels; no initial state). The conv output's gradient ``dv·d + D·dO`` is formed in
    the kernel, so no pass writes it; SSD's values gradients come out on the way.

    x ``[B, T, H·P]`` (unit channel stride), dv / do ``[B, T, H, P]`` contiguous (SSD's values gradient and
    output gradient), d ``[B, T, H]`` float32 contiguous, D ``[H]`` or ``[H, P]``; dx as in
    :func:`causal_conv1d_bwd_into`. Returns ``(dweight, dbias | empty, ddx [B, T, H] float32 = Σ_p dv·xc, dD)``
    with xc rounded to x's dtype, as SSD read it. Needs :func:`values_fold_fits`."""
    b, T, H, P = dv.shape
    if not values_fold_fits(P, config) or x.shape[2] != H * P:
        raise ValueError(f"causal_conv1d_bwd_values_into: head dim {P} must be a power of two dividing the channel "
                         f"tile {config[4]}, and x must have H·P = {H * P} channels, got {x.shape[2]}")  # fmt: skip
    for name, t in (("dv", dv), ("do", do), ("d", d)):
        if not t.is_contiguous() or t.shape[:3] != (b, T, H):
            raise ValueError(f"causal_conv1d_bwd_values_into: {name} must be contiguous [{b}, {T}, {H}, ...]")
    ddx = torch.empty(b, T, H, device=x.device, dtype=torch.float32)
    if config[3] % VALUES_BWD_UNROLL == 0:
        config = [*config[:6], VALUES_BWD_UNROLL]
    dw, db, _, dD_part = _bwd_launch(
        x, weight, bias, None, do.view(b, T, H * P), None, True, config, dx, values=(dv, d, D, ddx, P)
    )
    dD = dD_part.sum(0)
    dD = (dD.view(H, P) if D.dim() == 2 else dD.view(H, P).sum(1)).to(D.dtype)
    return dw, db, ddx, dD


def _bwd_launch(x, weight, bias, initial_state, dy, dfinal, silu, config, dx, values=None):
    """Launch :func:`_conv_bwd_kernel`: ``(dweight, dbias | empty, dinitial_state | empty, dD partials | None)``;
    ``values`` = (dv, d, D, ddx, P) for the VALUES mode."""
    bsz, T, C = x.shape
    W = weight.shape[1]
    if dx.shape != x.shape or dx.stride(2) != 1:
        raise ValueError(f"causal_conv1d_bwd_into: dx must be {list(x.shape)} with unit channel stride")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h0 = initial_state
    dh0 = torch.empty(bsz, C, W - 1, device=x.device, dtype=h0.dtype) if h0 is not None else x.new_empty(0)
    tl_rows, bc, nw = config[3:6]
    unroll = config[6] if len(config) > 6 else 4
    if not 1 <= unroll <= 4 or tl_rows % unroll:  # the kernel names up to 4 rows in flight (_lag)
        raise ValueError(f"causal_conv1d: bwd_unroll={unroll} must be in 1..4 and divide bwd_rows={tl_rows}")
    n_p = triton.cdiv(T + (W - 1 if h0 is not None else 0), tl_rows)
    dw_part = torch.empty(bsz * n_p, C, W, device=x.device, dtype=acc)
    db_part = torch.empty(bsz * n_p, C, device=x.device, dtype=acc)
    dv, d, D, ddx, P = values if values is not None else (x, x, x, x, 1)
    dD_part = torch.empty(bsz * n_p, C, device=x.device, dtype=acc) if values is not None else db_part
    grid = (n_p, triton.cdiv(C, bc), bsz)
    _conv_bwd_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        h0 if h0 is not None else x,
        dy,
        dfinal.contiguous() if dfinal is not None else x,
        dx,
        dh0 if h0 is not None else x,
        dw_part,
        db_part,
        dv,
        d,
        D,
        ddx,
        dD_part,
        T,
        C,
        x.stride(0),
        x.stride(1),
        h0.stride(0) if h0 is not None else 0,
        h0.stride(1) if h0 is not None else 0,
        dy.stride(0),
        dy.stride(1),
        dx.stride(0),
        dx.stride(1),
        C // P,
        W=W,
        TL=tl_rows,
        BC=bc,
        U=unroll,
        EVEN_C=C % bc == 0,
        HAS_BIAS=bias is not None,
        HAS_H0=h0 is not None,
        HAS_DFINAL=dfinal is not None,
        SILU=silu,
        FP64=x.dtype == torch.float64,
        VALUES=values is not None,
        P=P,
        D_PER_P=values is not None and D.dim() == 2,
        num_warps=nw,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dw, db, dh0, (dD_part if values is not None else None)


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, initial_state, dy, dfinal, silu, config):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else x.new_empty(0),
        torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, silu, config = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.cfg = (silu, config)
    ctx.set_materialize_grads(False)  # an unused final state needs no zero-filled gradient


def _backward(ctx, dy, dfinal):
    x, weight, bias, initial_state = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dw, db, dh0 = causal_conv1d_bwd(x, weight, bias, initial_state, dy, dfinal, *ctx.cfg)
    return dx, dw, db if bias is not None else None, dh0 if initial_state is not None else None, None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mixlab::causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """One decode step: x ``[B, C]``, conv_state ``[B, C, W-1]`` (shifted in place). Returns y ``[B, C]``."""
    bsz, C = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    bc = min(128, triton.next_power_of_2(C))
    _conv_update_kernel[(triton.cdiv(C, bc), bsz)](
        x,
        conv_state,
        weight,
        bias if bias is not None else weight,
        y,
        C,
        W=W,
        WP=triton.next_power_of_2(W),
        BC=bc,
        HAS_BIAS=bias is not None,
        SILU=silu,
        FP64=x.dtype == torch.float64,
        num_warps=4,
    )
    return y


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x)


def _prepare(x: Tensor, weight: Tensor, activation: str | None) -> tuple[Tensor, Tensor, bool]:
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d_triton: activation={activation!r}, allowed: None, 'silu', 'swish'")
    W = weight.shape[-1]
    if not 2 <= W <= 4:
        raise ValueError(f"causal_conv1d_triton: kernel width {W} is outside 2..4; use backend='reference'")
    return weight.contiguous(), W, activation is not None


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    *,
    config: list[int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal depthwise conv on Triton; same arguments and results as the reference ``causal_conv1d``.

    x ``[B, T, C]`` (a view with unit channel stride is read in place), weight ``[C, W]`` or ``[C, 1, W]``
    with W in 2..4, bias ``[C]``, initial_state ``[B, C, W-1]``. Returns ``(y [B, T, C], final_state | None)``.
    ``config`` overrides the tiles (see :func:`default_config`; for benchmarks).
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d_triton: x must be [B, T, C], got shape {tuple(x.shape)}")
    weight, W, silu = _prepare(x, weight, activation)
    bsz, T, C = x.shape
    if weight.shape[0] != C:
        raise ValueError(f"causal_conv1d_triton: weight has {weight.shape[0]} channels but x has {C}")
    if T == 0:
        raise ValueError("causal_conv1d_triton: the sequence is empty (T = 0)")
    if initial_state is not None and initial_state.shape != (bsz, C, W - 1):
        raise ValueError(
            f"causal_conv1d_triton: initial_state must be [B, C, W-1]={[bsz, C, W - 1]}, got {list(initial_state.shape)}"
        )
    if x.stride(2) != 1:
        x = x.contiguous()
    y, final = causal_conv1d_fwd(
        x,
        weight,
        bias.contiguous() if bias is not None else None,
        initial_state.contiguous() if initial_state is not None else None,
        silu,
        list(config) if config is not None else default_config(T, C),
    )
    return y, (final if output_final_state else None)


def causal_conv1d_update_triton(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """One decode step: x ``[B, C]``; conv_state ``[B, C, W-1]`` contiguous, updated in place
    (the oldest input drops out, x enters). Returns ``y [B, C]`` in x's dtype."""
    weight, W, silu = _prepare(x, weight, activation)
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_update_triton: x must be [B, C], got shape {tuple(x.shape)}")
    if conv_state.shape != (x.shape[0], x.shape[1], W - 1) or not conv_state.is_contiguous():
        raise ValueError(
            f"causal_conv1d_update_triton: conv_state must be a contiguous [B, C, W-1]={[x.shape[0], x.shape[1], W - 1]}"
        )
    return causal_conv1d_update(
        x.contiguous(), conv_state, weight, bias.contiguous() if bias is not None else None, silu
    )
