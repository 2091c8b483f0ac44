"""Fused causal depthwise conv (width 2-4, no bias) -> SiLU -> L2 norm per head, forward and backward.

The q/k input path of DeltaNet / Gated DeltaNet: x ``[B, T, H*K]`` (a projection's output, contiguous),
weight ``[H*K, W]``; ``pre[t] = sum_i w[i] x[t - (W-1) + i]`` (zeros before the sequence), ``s = silu(pre)``
and ``y = s / sqrt(sum_K s^2 + eps)`` for each head's K channels. Arithmetic in float32 (float64 for
float64 inputs); y in x's dtype.

One program owns one head's K channels (all of them, so the norm's sums stay in the program) and a run of
time rows. Forward: a ``[BT, K]`` tile, the W taps read from cache as in the conv kernel. Backward: with
``r = 1/sqrt(sum s^2 + eps)``, ``ds = r dy - s r^3 sum(dy s)``, ``dpre = ds silu'(pre)``, then the conv's
``dx[t] = sum_i w[i] dpre[t + W-1 - i]`` and ``dw[i] = sum_t dpre[t] x[t - (W-1) + i]``. It walks time
rows in order as :mod:`mixlab.ops.conv.triton`'s backward does (x[t] and dy[t] read once, the last W-1 rows
of x and dpre in registers); pre, s and r are recomputed there (no saved rstd: r is one more in-program
reduction per row, next to the one for ``sum(dy s)`` that cannot be saved, and the op needs no side
tensor from the forward). dw is a per-program partial sum (deterministic), added up at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import _lag, _rows

Tensor = torch.Tensor

__all__ = [
    "bwd_variants",
    "conv_silu_l2_bwd",
    "conv_silu_l2_bwd_into",
    "conv_silu_l2_fwd",
    "default_config",
    "supported",
]

#: float32 on an NVIDIA GPU: the SiLU's exp and reciprocal as approximate PTX instructions (see _sigmoid);
#: False: tl.exp and an IEEE-rounded division, as the interpreter (CPU) always runs
FAST_MATH = True
#: fla's l2norm epsilon (as ``mixlab.layers.deltanet.L2_EPS``; ops do not import layers)
EPS = 1e-6


@triton.jit
def _sigmoid(x, FP64: tl.constexpr, FAST: tl.constexpr):
    """``1 / (1 + exp(-x))``. FAST (float32 on a GPU): ex2 and rcp as the approximate flush-to-zero PTX
    instructions, 4 instructions an element instead of 11 (tl.exp and the division add range checks)."""
    if FAST:
        e = tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * -1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1
        )
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    elif FP64:
        r = 1.0 / (1.0 + tl.exp(-x))
    else:
        r = tl.fdiv(tl.full(x.shape, 1.0, x.dtype), 1.0 + tl.exp(-x))
    return r


@triton.jit
def _rsqrt(x, FP64: tl.constexpr):
    if FP64:
        r = 1.0 / tl.sqrt(x)
    else:
        r = tl.rsqrt(x)
    return r


@triton.jit
def _fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    T,
    HK,
    sxb,
    sxt,
    eps,
    W: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    FP64: tl.constexpr,
    FAST: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = h * K + tl.arange(0, K)
    acc = tl.zeros([BT, K], dtype=CT)
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + c * W + k).to(CT)
        r = t + (k - (W - 1))
        m = ((r >= 0) & (r < T))[:, None]  # broadcast over K: keeps the loads vectorised
        xv = tl.load(x_ptr + b * sxb + r[:, None].to(tl.int64) * sxt + c[None, :], mask=m, other=0.0)
        acc += wk[None, :] * xv.to(CT)
    s = acc * _sigmoid(acc, FP64, FAST)
    rstd = _rsqrt(tl.sum(s * s, 1) + eps, FP64)
    y = s * rstd[:, None]
    m = (t < T)[:, None]
    tl.store(y_ptr + (b * T + t)[:, None].to(tl.int64) * HK + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_row(
    xv, gv, x1, x2, x3, d1, d2, d3, w0, w1, w2, w3, eps, W: tl.constexpr, FP64: tl.constexpr, FAST: tl.constexpr
):
    """Row t: xv = x[t], gv = dy[t], x1..x3 = x[t-1..t-3], d1..d3 = dpre[t-1..t-3] (all [K], float).

    Returns (dpre[t], dx[t - (W-1)]); tap i pairs with x[t - (W-1) + i].
    """
    pre = w0 * _lag(W - 1, xv, x1, x2, x3) + w1 * _lag(W - 2, xv, x1, x2, x3)
    if W > 2:
        pre += w2 * _lag(W - 3, xv, x1, x2, x3)
    if W > 3:
        pre += w3 * xv
    sg = _sigmoid(pre, FP64, FAST)
    s = pre * sg
    r = _rsqrt(tl.sum(s * s, 0) + eps, FP64)
    dot = tl.sum(gv * s, 0)
    ds = r * gv - s * (r * r * r * dot)
    dpre = ds * sg * (1.0 + pre * (1.0 - sg))
    dxr = w0 * dpre + w1 * d1
    if W > 2:
        dxr += w2 * d2
    if W > 3:
        dxr += w3 * d3
    return dpre, dxr


@triton.jit
def _dw_acc(dpre, xv, x1, x2, x3, dw0, dw1, dw2, dw3, W: tl.constexpr):
    """dw[i] += dpre[t] x[t - (W-1) + i]."""
    dw0 += dpre * _lag(W - 1, xv, x1, x2, x3)
    dw1 += dpre * _lag(W - 2, xv, x1, x2, x3)
    if W > 2:
        dw2 += dpre * _lag(W - 3, xv, x1, x2, x3)
    if W > 3:
        dw3 += dpre * xv
    return dw0, dw1, dw2, dw3


@triton.jit
def _bwd_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    dw_part_ptr,
    T,
    HK,
    sxb,
    sxt,
    sdxb,
    sdxt,
    sdyb,
    sdyt,
    sdyh,
    eps,
    W: tl.constexpr,
    K: tl.constexpr,
    TL: tl.constexpr,
    U: tl.constexpr,
    FP64: tl.constexpr,
    FAST: tl.constexpr,
):
    # One program: head h's K channels and TL output rows s of dx, s in [pid_t * TL, pid_t * TL + TL); it walks
    # time rows t = s + W-1 in order (dx[s] needs dpre[s .. s+W-1]), after a warm-up of W-1 rows.
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kk = tl.arange(0, K)
    c = h * K + kk
    s0 = pid_t * TL
    w0 = tl.load(w_ptr + c * W + 0).to(CT)
    w1 = tl.load(w_ptr + c * W + 1).to(CT)
    w2 = w1
    w3 = w1
    if W > 2:
        w2 = tl.load(w_ptr + c * W + 2).to(CT)
    if W > 3:
        w3 = tl.load(w_ptr + c * W + 3).to(CT)
    zero = tl.zeros([K], dtype=CT)
    dw0 = zero
    dw1 = zero
    dw2 = zero
    dw3 = zero
    d1 = zero
    d2 = zero
    d3 = zero
    x_row = x_ptr + b * sxb + c
    dy_row = dy_ptr + b * sdyb + h * sdyh + kk
    # ring of x[s0 - 1], x[s0 - 2], x[s0 - 3] (zero before the sequence)
    x1 = tl.load(x_row + (s0 - 1).to(tl.int64) * sxt, mask=_rows(c, HK, s0 - 1, 0, T, True), other=0.0).to(CT)
    x2 = zero
    x3 = zero
    if W > 2:
        x2 = tl.load(x_row + (s0 - 2).to(tl.int64) * sxt, mask=_rows(c, HK, s0 - 2, 0, T, True), other=0.0).to(CT)
    if W > 3:
        x3 = tl.load(x_row + (s0 - 3).to(tl.int64) * sxt, mask=_rows(c, HK, s0 - 3, 0, T, True), other=0.0).to(CT)
    # warm-up rows t in [s0, s0 + W - 1): dpre only; their dw terms belong to this program only if it is the
    # first one (the others' warm-up rows are the previous program's main rows)
    first = (pid_t == 0).to(CT)
    for j in tl.static_range(W - 1):
        t = s0 + j
        xv = tl.load(x_row + t.to(tl.int64) * sxt, mask=_rows(c, HK, t, 0, T, True), other=0.0).to(CT)
        gv = tl.load(dy_row + t.to(tl.int64) * sdyt, mask=_rows(c, HK, t, 0, T, True), other=0.0).to(CT)
        dpre, _ = _bwd_row(xv, gv, x1, x2, x3, d1, d2, d3, w0, w1, w2, w3, eps, W, FP64, FAST)
        dw0, dw1, dw2, dw3 = _dw_acc(dpre * first, xv, x1, x2, x3, dw0, dw1, dw2, dw3, W)
        x3 = x2
        x2 = x1
        x1 = xv
        d3 = d2
        d2 = d1
        d1 = dpre
    # main rows, U at a time so that their loads are in flight together
    dx_row = dx_ptr + b * sdxb + c
    for it in range(TL // U):
        t = s0 + (W - 1) + it * U
        xa = tl.load(x_row + t.to(tl.int64) * sxt, mask=_rows(c, HK, t, 0, T, True), other=0.0)
        ga = tl.load(dy_row + t.to(tl.int64) * sdyt, mask=_rows(c, HK, t, 0, T, True), other=0.0)
        xb = xa
        gb = ga
        xc = xa
        gc = ga
        xd = xa
        gd = ga
        if U > 1:
            xb = tl.load(x_row + (t + 1).to(tl.int64) * sxt, mask=_rows(c, HK, t + 1, 0, T, True), other=0.0)
            gb = tl.load(dy_row + (t + 1).to(tl.int64) * sdyt, mask=_rows(c, HK, t + 1, 0, T, True), other=0.0)
        if U > 2:
            xc = tl.load(x_row + (t + 2).to(tl.int64) * sxt, mask=_rows(c, HK, t + 2, 0, T, True), other=0.0)
            gc = tl.load(dy_row + (t + 2).to(tl.int64) * sdyt, mask=_rows(c, HK, t + 2, 0, T, True), other=0.0)
            xd = tl.load(x_row + (t + 3).to(tl.int64) * sxt, mask=_rows(c, HK, t + 3, 0, T, True), other=0.0)
            gd = tl.load(dy_row + (t + 3).to(tl.int64) * sdyt, mask=_rows(c, HK, t + 3, 0, T, True), other=0.0)
        for j in tl.static_range(U):
            xv = _lag(j, xa, xb, xc, xd).to(CT)
            gv = _lag(j, ga, gb, gc, gd).to(CT)
            dpre, dxr = _bwd_row(xv, gv, x1, x2, x3, d1, d2, d3, w0, w1, w2, w3, eps, W, FP64, FAST)
            dw0, dw1, dw2, dw3 = _dw_acc(dpre, xv, x1, x2, x3, dw0, dw1, dw2, dw3, W)
            sr = t + j - (W - 1)
            tl.store(
                dx_row + sr.to(tl.int64) * sdxt, dxr.to(dx_ptr.dtype.element_ty), mask=_rows(c, HK, sr, 0, T, True)
            )
            x3 = x2
            x2 = x1
            x1 = xv
            d3 = d2
            d2 = d1
            d1 = dpre
    part = ((b * tl.num_programs(0) + pid_t) * HK + c).to(tl.int64)
    tl.store(dw_part_ptr + part * W + 0, dw0)
    tl.store(dw_part_ptr + part * W + 1, dw1)
    if W > 2:
        tl.store(dw_part_ptr + part * W + 2, dw2)
    if W > 3:
        tl.store(dw_part_ptr + part * W + 3, dw3)


def supported(K: int, W: int) -> bool:
    """Whether the fused kernels take head size K and conv width W (else use conv + a separate L2 norm)."""
    return 64 <= K <= 256 and K & (K - 1) == 0 and 2 <= W <= 4


def default_config(T: int, K: int) -> list[int]:
    """``[fwd_rows, fwd_warps, bwd_rows, bwd_unroll, bwd_warps]``: the forward's ``[rows, K]`` tile, the
    backward's rows per program, walked ``bwd_unroll`` at a time.

    From the sm_90 cross-compile (Triton 3.9, bf16, W 4, FAST_MATH; no spills in any): forward ``[2048 / K, K]``
    tiles on 4 warps, 16 elements a thread in 16-byte loads, 64 (K 256) / 71 (K 128) registers. Backward
    4 channels a thread (K / 128 warps, 8-byte loads): K 256 128 registers (16 warps an SM), K 128 137 (one
    warp: no barrier in the row reductions); 64 rows a program (the W-1 warm-up rows: 5% recompute), 4 rows
    in flight, ~45 SASS instructions an element in the row loop. Variants to time: :func:`bwd_variants`.
    """
    bt = min(max(2048 // K, 1), triton.next_power_of_2(max(T, 1)))
    tl_b = min(64, max(4, triton.next_power_of_2(T)))
    # H100 (results/conv-l2-...-2026-11-24.json): K 128 backward 0.27 -> 0.22 ms with 2 rows in flight
    return [bt, 4, tl_b, 4 if K > 128 else 2, max(1, K // 128)]


def bwd_variants(T: int, K: int) -> list[list[int]]:
    """Launch configs worth timing on a device (the benchmark's sweep); the first is the default."""
    base = default_config(T, K)
    fwd = base[:2]
    alts = [[128, 4, base[4]], [64, 2, base[4]], [64, 4, max(1, base[4] // 2)], [64, 4, 2 * base[4]]]
    return [base] + [fwd + a for a in alts if fwd + a != base]


def _fast(x: Tensor) -> bool:
    return FAST_MATH and x.is_cuda and torch.version.hip is None and x.dtype != torch.float64


def _check(x: Tensor, w: Tensor, n_heads: int) -> tuple[int, int, int, int, int]:
    B, T, HK = x.shape
    W = w.shape[1]
    if HK % n_heads or not supported(HK // n_heads, W) or w.shape[0] != HK:
        raise ValueError(f"conv_silu_l2: x {tuple(x.shape)}, weight {tuple(w.shape)}, {n_heads} heads unsupported")
    if x.stride(2) != 1 or not w.is_contiguous():
        raise ValueError("conv_silu_l2: x needs a unit channel stride and the weight must be contiguous")
    return B, T, HK, HK // n_heads, W


def conv_silu_l2_fwd(x: Tensor, w: Tensor, n_heads: int, eps: float = EPS, config: list[int] | None = None) -> Tensor:
    """x ``[B, T, H*K]`` (unit channel stride, e.g. a slice of a fused projection), w ``[H*K, W]`` (contiguous)
    -> ``l2(silu(conv(x)))`` as a contiguous y ``[B, T, H, K]``."""
    B, T, HK, K, W = _check(x, w, n_heads)
    bt, nw = (config or default_config(T, K))[:2]
    y = torch.empty(B, T, n_heads, K, device=x.device, dtype=x.dtype)
    _fwd_kernel[(triton.cdiv(T, bt), n_heads, B)](
        x, w, y, T, HK, x.stride(0), x.stride(1), eps,
        W=W, K=K, BT=bt, FP64=x.dtype == torch.float64, FAST=_fast(x), num_warps=nw,
    )  # fmt: skip
    return y


def conv_silu_l2_bwd(
    x: Tensor, w: Tensor, dy: Tensor, n_heads: int, eps: float = EPS, config: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """The backward of :func:`conv_silu_l2_fwd` from its inputs and dy ``[B, T, H, K]`` (unit last stride):
    ``(dx [B, T, H*K] in x's dtype, dw [H*K, W] in w's dtype)``."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return dx, conv_silu_l2_bwd_into(x, w, dy, n_heads, dx, eps, config)


def conv_silu_l2_bwd_into(
    x: Tensor, w: Tensor, dy: Tensor, n_heads: int, dx: Tensor, eps: float = EPS, config: list[int] | None = None
) -> Tensor:
    """:func:`conv_silu_l2_bwd` writing dx into a given ``[B, T, H*K]`` tensor with a unit channel stride (e.g. a
    slice of the fused projection's gradient); returns dw."""
    B, T, HK, K, W = _check(x, w, n_heads)
    if dx.shape != x.shape or dx.stride(2) != 1:
        raise ValueError(f"conv_silu_l2_bwd_into: dx must be {list(x.shape)} with unit channel stride")
    if dy.shape != (B, T, n_heads, K):
        raise ValueError(f"conv_silu_l2_bwd: dy must be {[B, T, n_heads, K]}, got {list(dy.shape)}")
    if dy.stride(3) != 1:
        dy = dy.contiguous()
    tl_rows, unroll, nw = (config or default_config(T, K))[2:5]
    if unroll not in (1, 2, 4) or tl_rows % unroll:
        raise ValueError(f"conv_silu_l2_bwd: bwd_unroll={unroll} must be 1, 2 or 4 and divide bwd_rows={tl_rows}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_p = triton.cdiv(T, tl_rows)
    dw_part = torch.empty(B * n_p, HK, W, device=x.device, dtype=acc)
    _bwd_kernel[(n_p, n_heads, B)](
        x,
        w,
        dy,
        dx,
        dw_part,
        T,
        HK,
        x.stride(0),
        x.stride(1),
        dx.stride(0),
        dx.stride(1),
        dy.stride(0),
        dy.stride(1),
        dy.stride(2),
        eps,
        W=W,
        K=K,
        TL=tl_rows,
        U=unroll,
        FP64=x.dtype == torch.float64,
        FAST=_fast(x),
        num_warps=nw,
    )
    return dw_part.sum(0).to(w.dtype)
