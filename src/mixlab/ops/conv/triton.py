"""Triton causal depthwise convolution: forward, backward and the one-token decode update.

Same contract as :func:`mixlab.ops.conv.reference.causal_conv1d`: x ``[B, T, C]`` (channels last, any
strides with unit channel stride), weight ``[C, W]``, the state ``[B, C, W-1]`` holds the W-1 inputs
before the sequence. Write ``xp = cat(initial_state, x)`` along time (length T+W-1); then
``pre[t] = bias + sum_k w[k] xp[t+k]``, ``y = act(pre)`` and ``final_state = xp[T:]``.

Backward works in xp's index space p in [0, T+W-1): ``dxp[p] = sum_i w[i] dpre[p-i] + dfinal[p-T]``,
which is dx for p >= W-1 and d(initial_state) below. ``dpre = dy * act'(pre)`` is recomputed from
x (its 2W-1 shifted tiles come from cache), so the backward reads x and dy once and writes dx once.
dweight and dbias are per-program partial sums (deterministic), added up at the end. Widths up to 4: the kernels
name each of the 2W-1 shifted tiles explicitly.
Arithmetic is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton", "default_config"]


@triton.jit
def _load_xp(x_ptr, h0_ptr, b, r, c, cmask, T, C, sxb, sxt, shb, shc, W: tl.constexpr, HAS_H0: tl.constexpr):
    """xp[b, r, c] for a [BT] vector r of xp rows and [BC] channels c: initial state below W-1, x above."""
    in_x = (r >= W - 1) & (r < T + W - 1)
    v = tl.load(
        x_ptr + b * sxb + (r - (W - 1))[:, None].to(tl.int64) * sxt + c[None, :],
        mask=in_x[:, None] & cmask[None, :],
        other=0.0,
    )
    if HAS_H0:
        in_h = (r >= 0) & (r < W - 1)
        hv = tl.load(h0_ptr + b * shb + c[None, :] * shc + r[:, None], mask=in_h[:, None] & cmask[None, :], other=0.0)
        v = tl.where(in_h[:, None], hv.to(v.dtype), v)
    return v


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
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SILU: tl.constexpr,
    FP64: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < C
    acc = tl.zeros([BT, BC], dtype=CT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(CT)[None, :]
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + c * W + k, mask=cmask, other=0.0).to(CT)
        xv = _load_xp(x_ptr, h0_ptr, b, t + k, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0)
        acc += wk[None, :] * xv.to(CT)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (t < T)[:, None] & cmask[None, :]
    tl.store(y_ptr + (b * T + t[:, None]).to(tl.int64) * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pick(s: tl.constexpr, xm3, xm2, xm1, x0, xp1, xp2, xp3):
    """The tile of xp rows shifted by the compile-time offset s in [-3, 3]."""
    if s == -3:
        r = xm3
    elif s == -2:
        r = xm2
    elif s == -1:
        r = xm1
    elif s == 0:
        r = x0
    elif s == 1:
        r = xp1
    elif s == 2:
        r = xp2
    else:
        r = xp3
    return r


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
    T,
    C,
    sxb,
    sxt,
    shb,
    shc,
    sdxb,
    sdxt,
    ITERS,
    W: tl.constexpr,
    WP: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    SILU: tl.constexpr,
    FP64: tl.constexpr,
):
    # Rows p of xp; dxp[p] = sum_i w[i] dpre[p - i] with pre[p - i] = bias + sum_k w[k] xp[p - i + k]:
    # only the 2W-1 shifts s = k - i in [-(W-1), W-1] of xp are loaded, once per tile.
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < C
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(CT)
    w0 = tl.load(w_ptr + c * W + 0, mask=cmask, other=0.0).to(CT)
    w1 = tl.load(w_ptr + c * W + 1, mask=cmask, other=0.0).to(CT)
    w2 = w1
    w3 = w1
    if W > 2:
        w2 = tl.load(w_ptr + c * W + 2, mask=cmask, other=0.0).to(CT)
    if W > 3:
        w3 = tl.load(w_ptr + c * W + 3, mask=cmask, other=0.0).to(CT)
    # per-tap dweight and dbias accumulated as tiles, reduced over rows once at the end
    dw0 = tl.zeros([BT, BC], dtype=CT)
    dw1 = tl.zeros([BT, BC], dtype=CT)
    dw2 = tl.zeros([BT, BC], dtype=CT)
    dw3 = tl.zeros([BT, BC], dtype=CT)
    db = tl.zeros([BT, BC], dtype=CT)
    for it in range(ITERS):
        p = (pid_p * ITERS + it) * BT + tl.arange(0, BT)  # rows of xp
        x0 = _load_xp(x_ptr, h0_ptr, b, p, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
        xm1 = _load_xp(x_ptr, h0_ptr, b, p - 1, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
        xp1 = _load_xp(x_ptr, h0_ptr, b, p + 1, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
        xm2 = x0
        xp2 = x0
        xm3 = x0
        xp3 = x0
        if W > 2:
            xm2 = _load_xp(x_ptr, h0_ptr, b, p - 2, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
            xp2 = _load_xp(x_ptr, h0_ptr, b, p + 2, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
        if W > 3:
            xm3 = _load_xp(x_ptr, h0_ptr, b, p - 3, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
            xp3 = _load_xp(x_ptr, h0_ptr, b, p + 3, c, cmask, T, C, sxb, sxt, shb, shc, W, HAS_H0).to(CT)
        dxp = tl.zeros([BT, BC], dtype=CT)
        for i in tl.static_range(W):
            q = p - i
            pre = w0[None, :] * _pick(0 - i, xm3, xm2, xm1, x0, xp1, xp2, xp3)
            pre += w1[None, :] * _pick(1 - i, xm3, xm2, xm1, x0, xp1, xp2, xp3)
            if W > 2:
                pre += w2[None, :] * _pick(2 - i, xm3, xm2, xm1, x0, xp1, xp2, xp3)
            if W > 3:
                pre += w3[None, :] * _pick(3 - i, xm3, xm2, xm1, x0, xp1, xp2, xp3)
            if HAS_BIAS:
                pre += bias[None, :]
            m = ((q >= 0) & (q < T))[:, None] & cmask[None, :]
            dpre = tl.load(dy_ptr + (b * T + q[:, None]).to(tl.int64) * C + c[None, :], mask=m, other=0.0).to(CT)
            if SILU:
                sg = tl.sigmoid(pre)
                dpre = dpre * sg * (1.0 + pre * (1.0 - sg))
            if i == 0:
                # rows q = p: dweight[k] += dpre[p] xp[p + k]
                db += dpre
                dw0 += dpre * x0
                dw1 += dpre * xp1
                if W > 2:
                    dw2 += dpre * xp2
                if W > 3:
                    dw3 += dpre * xp3
                dxp += w0[None, :] * dpre
            elif i == 1:
                dxp += w1[None, :] * dpre
            elif i == 2:
                dxp += w2[None, :] * dpre
            else:
                dxp += w3[None, :] * dpre
        if HAS_DFINAL:
            j = p - T
            jm = (j >= 0) & (j < W - 1)
            dxp += tl.load(
                dfinal_ptr + b * (C * (W - 1)) + c[None, :] * (W - 1) + j[:, None],
                mask=jm[:, None] & cmask[None, :],
                other=0.0,
            ).to(CT)
        in_x = (p >= W - 1) & (p < T + W - 1)
        tl.store(
            dx_ptr + b * sdxb + (p - (W - 1))[:, None].to(tl.int64) * sdxt + c[None, :],
            dxp.to(dx_ptr.dtype.element_ty),
            mask=in_x[:, None] & cmask[None, :],
        )
        if HAS_H0:
            in_h = (p >= 0) & (p < W - 1)
            tl.store(
                dh0_ptr + b * (C * (W - 1)) + c[None, :] * (W - 1) + p[:, None],
                dxp.to(dh0_ptr.dtype.element_ty),
                mask=in_h[:, None] & cmask[None, :],
            )
    part = ((b * tl.num_programs(0) + pid_p) * C + c).to(tl.int64)
    tl.store(db_part_ptr + part, tl.sum(db, 0), mask=cmask)
    tl.store(dw_part_ptr + part * W + 0, tl.sum(dw0, 0), mask=cmask)
    tl.store(dw_part_ptr + part * W + 1, tl.sum(dw1, 0), mask=cmask)
    if W > 2:
        tl.store(dw_part_ptr + part * W + 2, tl.sum(dw2, 0), mask=cmask)
    if W > 3:
        tl.store(dw_part_ptr + part * W + 3, tl.sum(dw3, 0), mask=cmask)


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
    """``[fwd_rows, fwd_channels, fwd_warps, bwd_rows, bwd_channels, bwd_warps]``: the tile of one program.

    The backward holds 2W-1 shifted tiles and five accumulators, so its tile is smaller (8 elements a
    thread). Chosen from an H100 sweep (benchmarks/NOTES-mamba-kernels.md).
    """
    bc = min(128, triton.next_power_of_2(C))
    bt = min(32, triton.next_power_of_2(max(T, 1)))
    return [bt, bc, 4, min(16, triton.next_power_of_2(T + 3)), min(64, bc), 4]


@torch.library.custom_op("mixlab::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, silu: bool, config: list[int]
) -> tuple[Tensor, Tensor]:
    """x ``[B, T, C]`` (unit channel stride), weight ``[C, W]`` contiguous. Returns ``(y, final_state)``."""
    bsz, T, C = x.shape
    W = weight.shape[1]
    y = torch.empty(bsz, T, C, device=x.device, dtype=x.dtype)
    bt, bc, nw = config[:3]
    h0 = initial_state
    grid = (triton.cdiv(T, bt), triton.cdiv(C, bc), bsz)
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
        BT=bt,
        BC=bc,
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
    bsz, T, C = x.shape
    W = weight.shape[1]
    dy = dy.contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty(bsz, T, C, device=x.device, dtype=x.dtype)
    h0 = initial_state
    dh0 = torch.empty(bsz, C, W - 1, device=x.device, dtype=h0.dtype) if h0 is not None else x.new_empty(0)
    bt, bc, nw = config[3:6]
    n_tiles = triton.cdiv(T + W - 1, bt)
    iters = max(1, min(8, n_tiles))
    n_p = triton.cdiv(n_tiles, iters)
    dw_part = torch.empty(bsz * n_p, C, W, device=x.device, dtype=acc)
    db_part = torch.empty(bsz * n_p, C, device=x.device, dtype=acc)
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
        T,
        C,
        x.stride(0),
        x.stride(1),
        h0.stride(0) if h0 is not None else 0,
        h0.stride(1) if h0 is not None else 0,
        dx.stride(0),
        dx.stride(1),
        iters,
        W=W,
        WP=triton.next_power_of_2(W),
        BT=bt,
        BC=bc,
        HAS_BIAS=bias is not None,
        HAS_H0=h0 is not None,
        HAS_DFINAL=dfinal is not None,
        SILU=silu,
        FP64=x.dtype == torch.float64,
        num_warps=nw,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db, dh0


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
