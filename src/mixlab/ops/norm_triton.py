"""Fused Triton RMSNorm and gated RMSNorm (forward + backward), same semantics as :mod:`mixlab.ops.norm`.

``gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate)``:
``norm_before_gate=False``: ``rmsnorm(x * silu(z)) * weight`` (Mamba2); ``True``: ``rmsnorm(x) * weight * silu(z)``
(Gated DeltaNet); z None: plain RMSNorm. Statistics over groups of ``group_size`` channels of the
last dim, in float32 (float64 for float64 inputs); output in x's dtype.

One program normalises ``BM`` rows of one group; the forward keeps ``1/rms`` per (row, group) for the
backward, which recomputes everything else from x and z. The weight gradient is a per-program partial
sum over rows (the backward programs loop over row blocks to keep few partials), added up at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["gated_rms_norm_triton", "rms_norm_lean_bwd", "rms_norm_lean_fwd", "rms_norm_triton"]


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    h_ptr,
    xo_ptr,
    xs_ptr,
    M,
    D,
    NG,
    eps,
    sz,
    GS: tl.constexpr,
    GSP: tl.constexpr,
    BM: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_W: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    FP64: tl.constexpr,
    HAS_H: tl.constexpr = False,
    STORE_XS: tl.constexpr = False,
):
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.program_id(1)
    j = tl.arange(0, GSP)
    cols = g * GS + j
    m = (rows < M)[:, None] & (j < GS)[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    a = tl.load(x_ptr + offs, mask=m, other=0.0).to(CT)
    if HAS_H:  # residual add (x + h, in x's dtype), stored as the new residual
        a = (a + tl.load(h_ptr + offs, mask=m, other=0.0).to(CT)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + offs, a, mask=m)
        a = a.to(CT)
    if STORE_XS:  # the normalised input in the backward's (narrower) dtype
        tl.store(xs_ptr + offs, a.to(xs_ptr.dtype.element_ty), mask=m)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * sz + cols[None, :], mask=m, other=0.0).to(CT)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            a = a * gate
    r = 1.0 / tl.sqrt(tl.sum(a * a, 1) / GS + eps)
    y = a * r[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=j < GS, other=0.0).to(CT)[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        y = y * gate
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows.to(tl.int64) * NG + g, r, mask=rows < M)


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    rstd_ptr,
    dy_ptr,
    dx_ptr,
    dz_ptr,
    dw_part_ptr,
    dres_ptr,
    dh_ptr,
    y_ptr,
    M,
    D,
    NG,
    ITERS,
    sdx,
    sdz,
    sz,
    eps,
    GS: tl.constexpr,
    GSP: tl.constexpr,
    BM: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_W: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
    FP64: tl.constexpr,
    HAS_DRES: tl.constexpr = False,
    STORE_DH: tl.constexpr = False,
    RECOMPUTE: tl.constexpr = False,
):
    # RECOMPUTE: 1/rms is computed from x (and z) instead of read, and the forward's output is stored to y_ptr
    # (contiguous), for a caller that needs it again in the backward (the output projection's weight gradient)
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    g = tl.program_id(1)
    j = tl.arange(0, GSP)
    cols = g * GS + j
    cmask = j < GS
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(CT)
    dw_acc = tl.zeros([GSP], dtype=CT)
    for it in range(ITERS):
        rows = (pid * ITERS + it) * BM + tl.arange(0, BM)
        rmask = rows < M
        m = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(CT)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(CT)
        if not RECOMPUTE:
            r = tl.load(rstd_ptr + rows.to(tl.int64) * NG + g, mask=rmask, other=0.0).to(CT)
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None].to(tl.int64) * sz + cols[None, :], mask=m, other=0.0).to(CT)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))
        a = x
        if HAS_Z and not NORM_BEFORE_GATE:
            a = x * gate
        if not HAS_Z:
            # Σ dxhat·xhat = r·Σ dxhat·a: a row sum that need not wait for 1/rms. H100, bf16 (results/norm-bwd-…-s12.json):
            # the residual norm's backward [32768, 2048] 0.376 -> 0.352 ms; with z (more tensors live across the sums)
            # it lost, 0.708 -> 0.787 ms for Mamba2's recomputing gated norm
            dxhat = dy
            if HAS_W:
                dxhat = dy * w[None, :]  # the same product as dxhat below (one multiply after CSE)
            s_da = tl.sum(dxhat * a, 1)
        if RECOMPUTE:
            r = 1.0 / tl.sqrt(tl.sum(a * a, 1) / GS + eps)
        xhat = a * r[:, None]
        if RECOMPUTE:  # the forward's output, as _norm_fwd_kernel forms it
            yo = xhat
            if HAS_W:
                yo = yo * w[None, :]
            if HAS_Z and NORM_BEFORE_GATE:
                yo = yo * gate
            tl.store(y_ptr + offs, yo.to(y_ptr.dtype.element_ty), mask=m)
        dn = dy
        if HAS_Z and NORM_BEFORE_GATE:
            n = xhat
            if HAS_W:
                n = n * w[None, :]
            dz = dy * n * dgate
            dn = dy * gate
        dxhat = dn
        if HAS_W:
            dw_acc += tl.sum(dn * xhat, 0)
            dxhat = dn * w[None, :]
        if HAS_Z:
            c = tl.sum(dxhat * xhat, 1) / GS
        else:
            c = r * s_da / GS
        da = r[:, None] * (dxhat - xhat * c[:, None])
        dx = da
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                dx = da * gate
                dz = da * x * dgate
            tl.store(dz_ptr + rows[:, None].to(tl.int64) * sdz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
        if HAS_DRES:  # the residual's own gradient, accumulated here instead of in a separate add
            dx += tl.load(dres_ptr + offs, mask=m, other=0.0).to(CT)
        if STORE_DH:  # the same gradient for the added branch, in its dtype
            tl.store(dh_ptr + offs, dx.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * sdx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, dw_acc, mask=cmask)


def _check_z(x: Tensor, z: Tensor | None, who: str) -> None:
    if z is not None and (z.shape != x.shape or z.stride(1) != 1):
        raise ValueError(f"{who}: z must be {list(x.shape)} with unit column stride, got {list(z.shape)}, {z.stride()}")


#: programs per SM of the backward (each loops over row blocks; the weight gradient is a partial sum per program)
BWD_PROGRAMS_PER_SM = 4
#: rows per block, at least, of a backward that recomputes 1/rms and the output. H100, [32768, 4096] bf16, one
#: group (Mamba2 1.3b; results/norm-conv-values-…-s11.json): 1 row 0.85 ms, 2 rows 0.71, 4 rows 1.19, against 0.87
#: for the forward recompute and the backward apart; the plain backward gains nothing from 2 rows (0.60 / 0.62)
RECOMPUTE_MIN_ROWS = 2


def _block_rows(gsp: int) -> int:
    return max(1, min(16, 4096 // gsp))


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwd_launch(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    y: Tensor,
    rstd: Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
    h: Tensor | None = None,
    x_new: Tensor | None = None,
    x_save: Tensor | None = None,
) -> None:
    """One launch of :func:`_norm_fwd_kernel` over x ``[M, D]`` into y and rstd ``[M, D // group_size]``; with h,
    the residual add first (into x_new); with x_save, the normalised input stored in its dtype."""
    M, D = x.shape
    ng = D // group_size
    gsp = triton.next_power_of_2(group_size)
    bm = _block_rows(gsp)
    _norm_fwd_kernel[(triton.cdiv(M, bm), ng)](
        x,
        z if z is not None else x,
        weight if weight is not None else x,
        y,
        rstd,
        h if h is not None else x,
        x_new if x_new is not None else x,
        x_save if x_save is not None else x,
        M,
        D,
        ng,
        eps,
        z.stride(0) if z is not None else 0,
        GS=group_size,
        GSP=gsp,
        BM=bm,
        HAS_Z=z is not None,
        HAS_W=weight is not None,
        NORM_BEFORE_GATE=norm_before_gate,
        FP64=rstd.dtype == torch.float64,
        HAS_H=h is not None,
        STORE_XS=x_save is not None,
        num_warps=4 if gsp <= 1024 else 8,
    )


@torch.library.custom_op("mixlab::gated_rms_norm_fwd", mutates_args=())
def gated_rms_norm_fwd(
    x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float, group_size: int, norm_before_gate: bool
) -> tuple[Tensor, Tensor]:
    """x ``[M, D]`` contiguous; z ``[M, D]`` with unit column stride (any row stride: a slice of a wider
    projection is read in place); weight ``[D]``. Returns ``(y [M, D], rstd [M, D // group_size] float32)``."""
    M, D = x.shape
    _check_z(x, z, "gated_rms_norm_fwd")
    y = torch.empty_like(x)
    rstd = torch.empty(M, D // group_size, device=x.device, dtype=_acc_dtype(x))
    _fwd_launch(x, z, weight, y, rstd, eps, group_size, norm_before_gate)
    return y, rstd


@gated_rms_norm_fwd.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[1] // group_size, dtype=_acc_dtype(x))


@torch.library.custom_op("mixlab::gated_rms_norm_bwd", mutates_args=())
def gated_rms_norm_bwd(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    rstd: Tensor,
    dy: Tensor,
    group_size: int,
    norm_before_gate: bool,
    dx_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dz, dweight)``; dz / dweight are empty when z / weight are absent. ``x`` and ``dy``
    may be narrower than the compute dtype (read and widened in the kernel); ``dx`` is in ``dx_dtype``
    (default x's): a caller that saved a bf16 copy of a float32 ``x`` passes it as is, and no widened
    copy appears in a compiled graph for the partitioner to save instead."""
    dx = torch.empty_like(x, dtype=dx_dtype)
    dz = torch.empty_like(z) if z is not None else x.new_empty(0)
    dw = gated_rms_norm_bwd_into(x, z, weight, rstd, dy, group_size, norm_before_gate, dx, dz)
    return dx, dz, dw


def gated_rms_norm_bwd_into(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    rstd: Tensor | None,
    dy: Tensor,
    group_size: int,
    norm_before_gate: bool,
    dx: Tensor,
    dz: Tensor,
    dres: Tensor | None = None,
    dh: Tensor | None = None,
    y: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """:func:`gated_rms_norm_bwd` writing dx and dz (``[M, D]``, any row stride, unit column stride: e.g. slices
    of a wider gradient buffer) into given tensors; returns dweight (empty without weight).

    Without z: ``dres`` ``[M, D]`` (contiguous) is added to dx, and ``dh`` ``[M, D]`` (contiguous) gets dx's
    values in its own dtype (see :func:`rms_norm_lean_bwd`).

    ``rstd`` None: ``1/rms`` is recomputed from x and z with ``eps``, and the forward's output is written to ``y``
    (``[M, D]`` contiguous), as :func:`gated_rms_norm_fwd` gives it: one pass instead of a forward recompute and a
    backward, for callers that need the output again (an output projection's weight gradient)."""
    M, D = x.shape
    recompute = rstd is None
    if recompute and (y is None or eps is None or y.shape != x.shape or not y.is_contiguous()):
        raise ValueError(f"gated_rms_norm_bwd_into: without rstd, pass eps and a contiguous {list(x.shape)} y")
    ng = D // group_size
    gsp = triton.next_power_of_2(group_size)
    bm = max(_block_rows(gsp), RECOMPUTE_MIN_ROWS) if recompute else _block_rows(gsp)
    dy = dy.contiguous()
    _check_z(x, z, "gated_rms_norm_bwd_into")
    for name, t in (("dx", dx), ("dz", dz)) if z is not None else (("dx", dx),):
        if t.shape != x.shape or t.stride(1) != 1:
            raise ValueError(f"gated_rms_norm_bwd_into: {name} must be {list(x.shape)} with unit column stride")
    for name, t in (("dres", dres), ("dh", dh)):
        if t is not None and (z is not None or t.shape != x.shape or not t.is_contiguous()):
            raise ValueError(f"gated_rms_norm_bwd_into: {name} must be a contiguous {list(x.shape)}, and z None")
    n_blocks = triton.cdiv(M, bm)
    max_prog = BWD_PROGRAMS_PER_SM * (
        torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    )
    n_prog = max(1, min(n_blocks, max(1, max_prog // ng)))
    iters = triton.cdiv(n_blocks, n_prog)
    n_prog = triton.cdiv(n_blocks, iters)
    acc = rstd.dtype if rstd is not None else _acc_dtype(x)
    dw_part = torch.empty(n_prog, D, device=x.device, dtype=acc) if weight is not None else dx
    _norm_bwd_kernel[(n_prog, ng)](
        x,
        z if z is not None else x,
        weight if weight is not None else x,
        rstd if rstd is not None else x,
        dy,
        dx,
        dz if z is not None else x,
        dw_part,
        dres if dres is not None else x,
        dh if dh is not None else x,
        y if recompute else x,
        M,
        D,
        ng,
        iters,
        dx.stride(0),
        dz.stride(0) if z is not None else 0,
        z.stride(0) if z is not None else 0,
        eps if recompute else 0.0,
        GS=group_size,
        GSP=gsp,
        BM=bm,
        HAS_Z=z is not None,
        HAS_W=weight is not None,
        NORM_BEFORE_GATE=norm_before_gate,
        FP64=acc == torch.float64,
        HAS_DRES=dres is not None,
        STORE_DH=dh is not None,
        RECOMPUTE=recompute,
        num_warps=4 if gsp <= 1024 else 8,
    )
    return dw_part.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)


@gated_rms_norm_bwd.register_fake
def _(x, z, weight, rstd, dy, group_size, norm_before_gate, dx_dtype=None):
    return (
        torch.empty_like(x, dtype=dx_dtype),
        torch.empty_like(z) if z is not None else x.new_empty(0),
        torch.empty_like(weight) if weight is not None else x.new_empty(0),
    )


@torch.library.custom_op("mixlab::rms_norm_lean_fwd", mutates_args=())
def rms_norm_lean_fwd(
    x: Tensor, h: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype, save_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A block's RMSNorm of its residual stream in one pass: optional residual add, output and saved copy.

    x ``[M, D]`` contiguous (the residual stream, float32), h ``[M, D]`` or None (a branch output, added
    first: ``x_new = x + h`` in x's dtype), weight ``[D]``. Returns ``(y, x_new, x_save, rstd)``: y
    ``[M, D]`` in ``out_dtype``; x_new ``[M, D]`` (empty without h); x_save ``[M, D]``, the normalised input
    in ``save_dtype`` for the backward; rstd ``[M, 1]`` float32 (float64 for float64 x). The same values as
    ``x + h.to(x.dtype)`` followed by :func:`gated_rms_norm_fwd` and two casts, without their round trips."""
    M, D = x.shape
    y = torch.empty_like(x, dtype=out_dtype)
    x_new = torch.empty_like(x) if h is not None else x.new_empty(0)
    x_save = torch.empty_like(x, dtype=save_dtype)
    rstd = torch.empty(M, 1, device=x.device, dtype=_acc_dtype(x))
    _fwd_launch(x, None, weight, y, rstd, eps, D, False, h=h, x_new=x_new if h is not None else None, x_save=x_save)
    return y, x_new, x_save, rstd


@rms_norm_lean_fwd.register_fake
def _(x, h, weight, eps, out_dtype, save_dtype):
    x_new = torch.empty_like(x) if h is not None else x.new_empty(0)
    return (
        torch.empty_like(x, dtype=out_dtype),
        x_new,
        torch.empty_like(x, dtype=save_dtype),
        x.new_empty(x.shape[0], 1, dtype=_acc_dtype(x)),
    )


@torch.library.custom_op("mixlab::rms_norm_lean_bwd", mutates_args=())
def rms_norm_lean_bwd(
    x_save: Tensor,
    weight: Tensor,
    rstd: Tensor,
    dy: Tensor,
    dres: Tensor | None,
    dx_dtype: torch.dtype,
    dh_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`rms_norm_lean_fwd`: ``(dx, dh, dweight)``. dx ``[M, D]`` in ``dx_dtype`` is the norm's
    input gradient plus ``dres`` (the gradient of x_new, or None); dh holds the same values in ``dh_dtype``
    (empty when None: no h); the residual add's gradients cost no extra pass."""
    D = x_save.shape[1]
    dx = torch.empty_like(x_save, dtype=dx_dtype)
    dh = torch.empty_like(x_save, dtype=dh_dtype) if dh_dtype is not None else None
    dres = dres.contiguous() if dres is not None else None
    dw = gated_rms_norm_bwd_into(x_save, None, weight, rstd, dy, D, False, dx, x_save.new_empty(0), dres, dh)
    return dx, dh if dh is not None else x_save.new_empty(0), dw


@rms_norm_lean_bwd.register_fake
def _(x_save, weight, rstd, dy, dres, dx_dtype, dh_dtype):
    dh = torch.empty_like(x_save, dtype=dh_dtype) if dh_dtype is not None else x_save.new_empty(0)
    return torch.empty_like(x_save, dtype=dx_dtype), dh, torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, z, weight, _eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.cfg = (group_size, norm_before_gate)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # rstd is an output only to be saved: no zero-filled gradient for it


def _backward(ctx, dy, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None
    dx, dz, dw = gated_rms_norm_bwd(x, z, weight, rstd, dy, *ctx.cfg)
    return dx, dz if z is not None else None, dw if weight is not None else None, None, None, None


gated_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_rms_norm_triton(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Fused gated RMSNorm; x, z ``[..., D]``, weight ``[D]``; returns ``[..., D]`` in x's dtype."""
    D = x.shape[-1]
    gs = D if group_size is None else int(group_size)
    if gs <= 0 or D % gs:
        raise ValueError(f"gated_rms_norm_triton: group_size={gs} must divide the last dim {D}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rms_norm_triton: z must have x's shape {list(x.shape)}, got {list(z.shape)}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"gated_rms_norm_triton: weight must be [{D}], got {list(weight.shape)}")
    if gs > 65536:
        raise ValueError(f"gated_rms_norm_triton: group_size={gs} is over 65536; use the plain gated_rms_norm")
    shape = x.shape
    y, _ = gated_rms_norm_fwd(
        x.reshape(-1, D).contiguous(),
        z.reshape(-1, D).contiguous() if z is not None else None,
        weight.contiguous() if weight is not None else None,
        float(eps),
        gs,
        bool(norm_before_gate),
    )
    return y.reshape(shape)


def rms_norm_triton(x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Fused RMSNorm over the last dim; x ``[..., D]``, weight ``[D]``."""
    return gated_rms_norm_triton(x, None, weight, eps)
