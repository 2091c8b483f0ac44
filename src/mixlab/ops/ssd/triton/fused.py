"""SSD on the chunk kernels with its elementwise stages fused around them, with a hand-written backward.

``mixlab::ssd_fused_fwd`` runs, per token and head (``s = dt + dt_bias``, ``d = softplus(s)`` if asked):

* dt: ``d`` and ``g = d·A`` (float32 ``[B, T, H]``) in one small kernel;
* the scan: the chunk kernels with scaled values (``V = x·d`` formed on load, x read in place, e.g. as a
  view of Mamba2's conv output) and the ``D·x`` skip added to their output, so the forward writes no ``V``
  and runs no separate skip pass; this gives ``y = SSD(x) + D·x`` in x's dtype;
* only with z: ``out = y·silu(z)`` in float32, cast once.

``mixlab::ssd_fused_bwd`` runs the reverse: with z, ``dy = dout·silu(z)`` and ``dz``; the chunk backward
(dq, dk, dV, dg; its state recompute writes ``V`` once, for ``dqkwg``); then one pass over the values:
``dx = dV·d + D·dy``, ``dd = Σ_p dV·x + dg·A``, ``ddt = dd·softplus'(s)``. Reductions over tokens
(d dt_bias, dA, dD) are per-program float32 partials summed afterwards (deterministic).

H100, 65,536 tokens, H64 P64 N128 (``results/kernels-ssd-scaled-values-*-s9.json``): ``V`` formed on load in
the state kernels instead of a prep pass writing it, forward 1.52 → 1.16 ms. Slower and not kept: ``dx``
inside the reverse state pass ``_bwd_dh_kernel`` (1.54 → 2.54 ms, against 0.58 for the separate pass), and
``dqkwg`` reading x instead of the recompute's ``V`` (2.65 → 3.20 ms forming ``x·d`` per tile, 3.16 with
``d`` scaling the products' sums).

Tensors ``[B, T, H, P]`` are handled as ``[B·T, H, P]`` token streams with a token and a head stride
(unit stride along P), so strided views are read in place. The ``[BT, P]`` kernels run a program per
``BT`` tokens × one head, the head the fastest grid axis so that neighbouring programs share token rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton.chunk import chunk_bwd, chunk_fwd, segment_states_shape, token_stride

Tensor = torch.Tensor

#: tokens per program of the dt kernel ([BT, H] tiles), elements of the other kernels' [BT, BP] tiles
#: (BT = TILE // BP tokens), and warps per kernel
DT_TOKENS = 64
TILE = {"values_bwd": 4096, "finish_fwd": 4096, "finish_bwd": 4096}
WARPS = {"dt_fwd": 4, "values_bwd": 8, "finish_fwd": 4, "finish_bwd": 8}


# --------------------------------------------------------------------------------------------------
# kernels (float32 arithmetic)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(s):
    """torch's softplus (threshold 20) with an accurate ``log1p(e) = log(u)·e/(u−1)``, ``u = 1+e``, and its
    derivative ``e/u`` (1 above the threshold)."""
    e = tl.exp(tl.minimum(s, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(s > 20.0, s, lp), tl.where(s > 20.0, 1.0, e / u)


@triton.jit
def _dt_tile(
    dt, sdt_t, sdt_h, dt_bias, NTOK, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """This program's ``[BT, BH]`` tile of ``s = dt + bias``: ``(rows, heads, mask, s)``, s in float32."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    heads = tl.arange(0, BH)
    m = (rows < NTOK)[:, None] & (heads < H)[None, :]
    s = tl.load(dt + rows[:, None] * sdt_t + heads[None, :] * sdt_h, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(dt_bias + heads, mask=heads < H, other=0.0).to(tl.float32)[None, :]
    return rows, heads, m, s


@triton.jit
def _dt_fwd_kernel(
    dt, sdt_t, sdt_h, dt_bias, A, d, g, NTOK,
    H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """``d = softplus(dt + bias)`` and ``g = d·A``, both ``[NTOK, H]`` float32 contiguous."""
    rows, heads, m, s = _dt_tile(dt, sdt_t, sdt_h, dt_bias, NTOK, H, BT, BH, HAS_BIAS)
    if SOFTPLUS:
        s, _ = _softplus(s)
    a = tl.load(A + heads, mask=heads < H, other=0.0).to(tl.float32)[None, :]
    p = rows[:, None] * H + heads[None, :]
    tl.store(d + p, s, mask=m)
    tl.store(g + p, s * a, mask=m)


@triton.jit
def _dt_bwd_kernel(
    ddx, dg, dt, sdt_t, sdt_h, dt_bias, A, ddt, sddt_t, sddt_h, part_bias, part_A, NTOK,
    H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """The dt stage's backward given the values' term ``ddx = Σ_p dv·x`` (float32 ``[NTOK, H]`` contiguous, as dg):
    ``dd = ddx + dg·A``, ``ddt = dd·softplus'(s)`` (any token / head stride), and per-program partial sums of ddt
    (d dt_bias) and ``dg·d`` (dA) into ``part_* [n_blocks, H]``."""
    rows, heads, m, s = _dt_tile(dt, sdt_t, sdt_h, dt_bias, NTOK, H, BT, BH, HAS_BIAS)
    d = s
    if SOFTPLUS:
        d, dsp = _softplus(s)
    a = tl.load(A + heads, mask=heads < H, other=0.0).to(tl.float32)[None, :]
    p = rows[:, None] * H + heads[None, :]
    b_dg = tl.load(dg + p, mask=m, other=0.0)
    dd = tl.load(ddx + p, mask=m, other=0.0) + b_dg * a
    if SOFTPLUS:
        dd = dd * dsp
    tl.store(ddt + rows[:, None] * sddt_t + heads[None, :] * sddt_h, dd.to(ddt.dtype.element_ty), mask=m)
    i_b = tl.program_id(0)
    tl.store(part_bias + i_b * H + heads, tl.sum(dd, axis=0), mask=heads < H)
    tl.store(part_A + i_b * H + heads, tl.sum(b_dg * d, axis=0), mask=heads < H)


@triton.jit
def _values_bwd_kernel(
    x, sx_t, sx_h, dt, sdt_t, sdt_h, dt_bias, A, dv, dg, dy, D, dx, ddt, part_bias, part_A, part_D, NTOK,
    H: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
):  # fmt: skip
    """Backward of the values ``V = x·d`` and the skip ``D·x``: ``dx = dv·d (+ D·dy)``; ``dd = Σ_p dv·x + dg·A``;
    ``ddt = dd·softplus'(s)``; per-program partial sums of ddt (d dt_bias), ``dg·d`` (dA) and ``dy·x`` (dD)
    into ``part_* [n_blocks, H(, P)]``. dv, dy, dx contiguous."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    rows = (i_b * BT + tl.arange(0, BT)).to(tl.int64)
    m_t = rows < NTOK
    cols = tl.arange(0, BP)
    m = m_t[:, None] & (cols < P)[None, :]
    s = tl.load(dt + rows * sdt_t + i_h * sdt_h, mask=m_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(dt_bias + i_h).to(tl.float32)
    d = s
    if SOFTPLUS:
        d, dsp = _softplus(s)
    a = tl.load(A + i_h).to(tl.float32)
    b_dg = tl.load(dg + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    p_c = rows[:, None] * (H * P) + i_h * P + cols[None, :]
    b_x = tl.load(x + rows[:, None] * sx_t + i_h * sx_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_dv = tl.load(dv + p_c, mask=m, other=0.0).to(tl.float32)
    b_dx = b_dv * d[:, None]
    if HAS_D:
        b_dy = tl.load(dy + p_c, mask=m, other=0.0).to(tl.float32)
        if D_PER_P:
            b_dx += b_dy * tl.load(D + i_h * P + cols, mask=cols < P, other=0.0).to(tl.float32)[None, :]
            tl.store(part_D + (i_b * H + i_h) * P + cols, tl.sum(b_dy * b_x, axis=0), mask=cols < P)
        else:
            b_dx += b_dy * tl.load(D + i_h).to(tl.float32)
            tl.store(part_D + i_b * H + i_h, tl.sum(tl.sum(b_dy * b_x, axis=1), axis=0))
    tl.store(dx + p_c, b_dx.to(dx.dtype.element_ty), mask=m)
    dd = tl.sum(b_dv * b_x, axis=1) + b_dg * a
    if SOFTPLUS:
        dd = dd * dsp
    tl.store(ddt + rows * H + i_h, dd.to(ddt.dtype.element_ty), mask=m_t)
    tl.store(part_bias + i_b * H + i_h, tl.sum(dd, axis=0))
    tl.store(part_A + i_b * H + i_h, tl.sum(b_dg * d, axis=0))


@triton.jit
def _finish_fwd_kernel(
    y, z, sz_t, sz_h, out, NTOK, H: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """``out = y·silu(z)`` in float32, cast to out's dtype. y, out contiguous."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    rows = (i_b * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, BP)
    m = (rows < NTOK)[:, None] & (cols < P)[None, :]
    p_c = rows[:, None] * (H * P) + i_h * P + cols[None, :]
    b_o = tl.load(y + p_c, mask=m, other=0.0).to(tl.float32)
    b_z = tl.load(z + rows[:, None] * sz_t + i_h * sz_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out + p_c, (b_o * (b_z / (1.0 + tl.exp(-b_z)))).to(out.dtype.element_ty), mask=m)


@triton.jit
def _finish_bwd_kernel(
    do, so_t, so_h, y, z, sz_t, sz_h, dy, dz, NTOK,
    H: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """``dy = dout·silu(z)`` (y's dtype), ``dz = dout·y·silu'(z)``. y, dy, dz contiguous."""
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    rows = (i_b * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, BP)
    m = (rows < NTOK)[:, None] & (cols < P)[None, :]
    p_c = rows[:, None] * (H * P) + i_h * P + cols[None, :]
    b_do = tl.load(do + rows[:, None] * so_t + i_h * so_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_z = tl.load(z + rows[:, None] * sz_t + i_h * sz_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    sg = 1.0 / (1.0 + tl.exp(-b_z))
    b_y = tl.load(y + p_c, mask=m, other=0.0).to(tl.float32)
    tl.store(dz + p_c, (b_do * b_y * sg * (1.0 + b_z * (1.0 - sg))).to(dz.dtype.element_ty), mask=m)
    tl.store(dy + p_c, (b_do * (b_z * sg)).to(dy.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def _tokens(t: Tensor) -> tuple[Tensor, int, int]:
    """``t [B, T, H(, P)]`` as a token stream: ``(t', token stride, head stride)``, copying only when the
    tokens of different batch rows are not evenly spaced or P is strided."""
    b, T = t.shape[:2]
    if (t.dim() == 4 and t.stride(3) != 1) or (b > 1 and T > 0 and t.stride(0) != T * t.stride(1)):
        t = t.contiguous()
    return t, t.stride(1), t.stride(2)


def _values(x: Tensor) -> Tensor:
    """x as the chunk kernels' scaled values read it (heads P apart, evenly spaced tokens), copied otherwise."""
    try:
        token_stride(x)
        return x
    except ValueError:
        return x.contiguous()


def _grid(name: str, ntok: int, H: int, P: int) -> tuple[tuple[int, int], dict]:
    BP = triton.next_power_of_2(P)
    BT = max(1, TILE[name] // BP)
    return (H, triton.cdiv(ntok, BT)), {"BT": BT, "BP": BP, "num_warps": WARPS[name]}


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


def ssd_dt(dt: Tensor, A: Tensor, dt_bias: Tensor | None, dt_softplus: bool) -> tuple[Tensor, Tensor]:
    """The dt stage alone (plain function, also for callers that recompute it in a backward): dt ``[B, T, H]``
    (any token stride) -> ``(d = softplus(dt + dt_bias), g = d·A)``, both ``[B, T, H]`` float32 contiguous."""
    b, T, H = dt.shape
    ntok = b * T
    dts, sdt_t, sdt_h = _tokens(dt)
    d = torch.empty(b, T, H, device=dt.device, dtype=torch.float32)
    g = torch.empty(b, T, H, device=dt.device, dtype=torch.float32)
    if ntok:
        _dt_fwd_kernel[(triton.cdiv(ntok, DT_TOKENS),)](
            dts, sdt_t, sdt_h, dt_bias if dt_bias is not None else A, A, d, g, ntok, H=H, BT=DT_TOKENS,
            BH=triton.next_power_of_2(H), HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
            num_warps=WARPS["dt_fwd"],
        )  # fmt: skip
    return d, g


def ssd_dt_bwd(
    ddx: Tensor, dg: Tensor, dt: Tensor, A: Tensor, dt_bias: Tensor | None, dt_softplus: bool, ddt: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Backward of :func:`ssd_dt` for a caller that formed the values' term itself (plain function; Mamba2's conv
    backward with the values folded in): ddx = ``Σ_p dV·x`` and dg (``dL/dg``), float32 ``[B, T, H]`` contiguous;
    dt as the forward's. Writes ``ddt`` (``[B, T, H]``, evenly spaced tokens, any head stride: e.g. a slice of the
    in_proj gradient) and returns ``(dA, d dt_bias | None)``."""
    b, T, H = dt.shape
    ntok = b * T
    dts, sdt_t, sdt_h = _tokens(dt)
    if ddt.shape != dt.shape or (b > 1 and T > 0 and ddt.stride(0) != T * ddt.stride(1)):
        raise ValueError(f"ssd_dt_bwd: ddt must be {list(dt.shape)} with evenly spaced tokens, got {ddt.stride()}")
    nblk = triton.cdiv(ntok, DT_TOKENS)
    part_bias = torch.zeros(nblk, H, device=dt.device, dtype=torch.float32)
    part_A = torch.zeros(nblk, H, device=dt.device, dtype=torch.float32)
    if ntok:
        _dt_bwd_kernel[(nblk,)](
            ddx, dg, dts, sdt_t, sdt_h, dt_bias if dt_bias is not None else A, A, ddt, ddt.stride(1), ddt.stride(2),
            part_bias, part_A, ntok, H=H, BT=DT_TOKENS, BH=triton.next_power_of_2(H), HAS_BIAS=dt_bias is not None,
            SOFTPLUS=dt_softplus, num_warps=WARPS["dt_fwd"],
        )  # fmt: skip
    return part_A.sum(0).to(A.dtype), part_bias.sum(0).to(dt_bias.dtype) if dt_bias is not None else None


@torch.library.custom_op("mixlab::ssd_fused_fwd", mutates_args=())
def ssd_fused_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    q: Tensor,
    k: Tensor,
    dt_bias: Tensor | None,
    D: Tensor | None,
    z: Tensor | None,
    initial_state: Tensor | None,
    dt_softplus: bool,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x ``[B, T, H, P]``, dt ``[B, T, H]``, q = C / k = B ``[B, T, G, N]`` in x's dtype (contiguous),
    initial_state ``[N_seq, H, N, P]`` (the kernels' transposed layout). Returns
    ``(out [B, T, H, P], final_state [N_seq, H, N, P] | empty, d, g, y | empty, hs | empty)``: d/g (float32
    ``[B, T, H]``), y (``SSD(x) + D·x``, only with z; without it out is y) and the segment states hs (few long
    sequences, see ``chunk.recompute_segment_chunks``) are saved for the backward."""
    b, T, H, P = x.shape
    ntok = b * T
    d, g = ssd_dt(dt, A, dt_bias, dt_softplus)
    y, ht, *_, hs = chunk_fwd(
        q, k, _values(x), None, g, 1.0, initial_state, output_final_state, cu_seqlens, False, xd=d, D=D
    )
    if ht is None:
        ht = _empty(y).float()
    hs = hs if hs is not None else _empty(y).float()
    if z is None:
        return y, ht, d, g, _empty(y), hs
    out = torch.empty_like(y)
    if ntok:
        zs, sz_t, sz_h = _tokens(z)
        grid, kw = _grid("finish_fwd", ntok, H, P)
        _finish_fwd_kernel[grid](y, zs, sz_t, sz_h, out, ntok, H=H, P=P, **kw)
    return out, ht, d, g, y, hs


@ssd_fused_fwd.register_fake
def _(x, dt, A, q, k, dt_bias, D, z, initial_state, dt_softplus, output_final_state, cu_seqlens):
    b, T, H, P = x.shape
    N = q.shape[-1]
    nseq = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else b
    ht = x.new_empty(nseq, H, N, P, dtype=torch.float32) if output_final_state else x.new_empty(0, dtype=torch.float32)
    y = x.new_empty(b, T, H, P) if z is not None else x.new_empty(0)
    f32 = torch.float32
    d, g = x.new_empty(b, T, H, dtype=f32), x.new_empty(b, T, H, dtype=f32)
    hs = x.new_empty(segment_states_shape(b, T, H, N, P, cu_seqlens is not None), dtype=f32)
    return x.new_empty(b, T, H, P), ht, d, g, y, hs


@torch.library.custom_op("mixlab::ssd_fused_bwd", mutates_args=())
def ssd_fused_bwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    q: Tensor,
    k: Tensor,
    dt_bias: Tensor | None,
    D: Tensor | None,
    z: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    d: Tensor,
    g: Tensor,
    y: Tensor,
    dout: Tensor,
    dht: Tensor | None,
    dt_softplus: bool,
    hs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, ddt, dA, dq, dk, d dt_bias | empty, dD | empty, dz | empty, d initial_state | empty)``,
    each in its input's dtype. d, g: :func:`ssd_dt` of the forward; y: the forward's y (with z only); hs: its
    segment states (None or empty: the state recompute runs unsegmented)."""
    b, T, H, P = x.shape
    ntok = b * T
    dev = x.device
    dz = _empty(x)
    if z is not None:
        dos, so_t, so_h = _tokens(dout)
        dy = torch.empty(b, T, H, P, device=dev, dtype=x.dtype)
        zs, sz_t, sz_h = _tokens(z)
        dz = torch.empty(b, T, H, P, device=dev, dtype=z.dtype)
        if ntok:
            grid, kw = _grid("finish_bwd", ntok, H, P)
            _finish_bwd_kernel[grid](dos, so_t, so_h, y, zs, sz_t, sz_h, dy, dz, ntok, H=H, P=P, **kw)
    else:
        dy = dout.to(x.dtype).contiguous()
    xv = _values(x)
    dq, dk, dv, _, dg, dh0 = chunk_bwd(
        q,
        k,
        xv,
        None,
        g,
        1.0,
        initial_state,
        cu_seqlens,
        None,
        None,
        None,
        dy,
        dht,
        False,
        xd=d,
        hs=hs if hs is not None and hs.numel() else None,
    )
    has_d = D is not None
    dx = torch.empty(b, T, H, P, device=dev, dtype=x.dtype)
    ddt = torch.empty(b, T, H, device=dev, dtype=dt.dtype)
    grid, kw = _grid("values_bwd", ntok, H, P)
    part_bias = torch.zeros(grid[1], H, device=dev, dtype=torch.float32)
    part_A = torch.zeros(grid[1], H, device=dev, dtype=torch.float32)
    part_D = torch.zeros(grid[1], *(D.shape if has_d else (1,)), device=dev, dtype=torch.float32)
    if ntok:
        xs, sx_t, sx_h = _tokens(xv)
        dts, sdt_t, sdt_h = _tokens(dt)
        _values_bwd_kernel[grid](
            xs, sx_t, sx_h, dts, sdt_t, sdt_h, dt_bias if dt_bias is not None else A, A, dv, dg, dy,
            D if has_d else A, dx, ddt, part_bias, part_A, part_D, ntok, H=H, P=P,
            HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_D=has_d, D_PER_P=has_d and D.dim() == 2, **kw,
        )  # fmt: skip
    dA = part_A.sum(0).to(A.dtype)
    dbias = part_bias.sum(0).to(dt_bias.dtype) if dt_bias is not None else _empty(x)
    return (
        dx,
        ddt,
        dA,
        dq,
        dk,
        dbias,
        part_D.sum(0).to(D.dtype) if has_d else _empty(x),
        dz,
        dh0.to(initial_state.dtype) if initial_state is not None else _empty(x),
    )


@ssd_fused_bwd.register_fake
def _(x, dt, A, q, k, dt_bias, D, z, initial_state, cu_seqlens, d, g, y, dout, dht, dt_softplus, hs=None):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(dt, memory_format=torch.contiguous_format),
        torch.empty_like(A),
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(dt_bias) if dt_bias is not None else x.new_empty(0),
        torch.empty_like(D) if D is not None else x.new_empty(0),
        torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else x.new_empty(0),
        torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, q, k, dt_bias, D, z, initial_state, dt_softplus, output_final_state, cu_seqlens = inputs
    _, _, d, g, y, hs = output
    ctx.save_for_backward(x, dt, A, q, k, dt_bias, D, z, initial_state, cu_seqlens, d, g, y, hs)
    ctx.dt_softplus, ctx.output_final_state = dt_softplus, output_final_state
    ctx.set_materialize_grads(False)  # d, g, y, hs are outputs only to be saved: no zero gradients for them


def _backward(ctx, dout, dht, dd_, dg_, dy_, dhs_):
    x, dt, A, q, k, dt_bias, D, z, initial_state, cu_seqlens, d, g, y, hs = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    dht = dht.contiguous() if ctx.output_final_state and dht is not None and dht.numel() else None
    dx, ddt, dA, dq, dk, dbias, dD, dz, dh0 = ssd_fused_bwd(
        x, dt, A, q, k, dt_bias, D, z, initial_state, cu_seqlens, d, g, y, dout, dht, ctx.dt_softplus, hs
    )
    return (
        dx,
        ddt,
        dA,
        dq,
        dk,
        dbias if dt_bias is not None else None,
        dD if D is not None else None,
        dz if z is not None else None,
        dh0 if initial_state is not None else None,
        None,
        None,
        None,
    )


ssd_fused_fwd.register_autograd(_backward, setup_context=_setup_context)


def ssd_fused(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SSD through ``mixlab::ssd_fused_fwd``; shapes and results as :func:`mixlab.ops.ssd.triton.ssd_triton`."""
    q = C.to(x.dtype).contiguous()
    k = B.to(x.dtype).contiguous()
    h0 = initial_state.transpose(-1, -2).contiguous() if initial_state is not None else None  # [N, H, N_state, P]
    out, ht, *_ = ssd_fused_fwd(x, dt, A, q, k, dt_bias, D, z, h0, dt_softplus, output_final_state, cu_seqlens)
    return out, (ht.transpose(-1, -2) if output_final_state else None)


__all__ = ["ssd_dt", "ssd_fused"]
