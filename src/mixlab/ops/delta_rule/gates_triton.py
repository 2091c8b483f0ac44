"""The delta rule's gates from columns of a packed projection, forward and backward, one Triton kernel each way.

``proj [N, C]`` (any row stride, unit column stride) holds per row ``b`` (H channels at column ``col_b``) and, gated,
``a`` (H channels at ``col_a``): ``beta = sigmoid(b)`` and ``g = -exp(A_log) * softplus(a + dt_bias)`` (softplus
as ``F.softplus``: ``x`` above 20), float32 ``[N, H]``. The backward writes ``db = dbeta * beta (1 - beta)`` and
``da = dg * (-exp(A_log) sigmoid(a + dt_bias))`` into the same columns of the projection's gradient (in its dtype)
and zeros its columns ``[col_zero, C)`` (padding), and returns ``dA_log = sum dg * g`` and ``ddt_bias = sum da``
over the rows (float32 per-program partial sums, added up at the end: deterministic).

These are the gates of :mod:`mixlab.layers.deltanet`'s lean path, where PyTorch ops had launched about 25 small
kernels per layer, forward and backward (a traced 1.3b step: 525 kernels on ``[B, T, H]`` tensors over 21 layers,
1.6 ms of device time; ``benchmarks/results/trace-gdn-h1-by-op-…-s8.json``, 'gdn-after-gate-ops'). The torch
ops remain the definition (the unfused path), and the tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gates_bwd", "gates_fwd"]

BLOCK_ROWS = 128


@triton.jit
def _gates_fwd_kernel(
    proj, A_log, dt_bias, beta, g, N, stride, col_b, col_a,
    H: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BH)
    m = (rows < N)[:, None] & (cols < H)[None, :]
    p = proj + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    out = rows.to(tl.int64)[:, None] * H + cols[None, :]
    b = tl.load(p + col_b, mask=m, other=0.0).to(tl.float32)
    tl.store(beta + out, 1.0 / (1.0 + tl.exp(-b)), mask=m)
    if GATED:
        a = tl.load(p + col_a, mask=m, other=0.0).to(tl.float32)
        a += tl.load(dt_bias + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        sp = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))
        neg_A = -tl.exp(tl.load(A_log + cols, mask=cols < H, other=0.0).to(tl.float32))
        tl.store(g + out, neg_A[None, :] * sp, mask=m)


@triton.jit
def _gates_bwd_kernel(
    proj, A_log, dt_bias, dbeta, dg, dproj, dA_part, ddt_part, N, stride, dstride, col_b, col_a, col_zero, C,
    H: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, BZ: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, BH)
    mr = rows < N
    m = mr[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    p, dp, gi = proj + r64 * stride + cols[None, :], dproj + r64 * dstride + cols[None, :], r64 * H + cols[None, :]
    dt = dproj.dtype.element_ty
    b = tl.load(p + col_b, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-b))
    tl.store(dp + col_b, (tl.load(dbeta + gi, mask=m, other=0.0) * s * (1.0 - s)).to(dt), mask=m)
    if GATED:
        a = tl.load(p + col_a, mask=m, other=0.0).to(tl.float32)
        a += tl.load(dt_bias + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        sp = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))
        neg_A = -tl.exp(tl.load(A_log + cols, mask=cols < H, other=0.0).to(tl.float32))
        d = tl.load(dg + gi, mask=m, other=0.0)
        da = d * neg_A[None, :] / (1.0 + tl.exp(-a))
        tl.store(dp + col_a, da.to(dt), mask=m)
        da = tl.where(m, da, 0.0)
        tl.store(dA_part + pid * H + cols, tl.sum(tl.where(m, d * neg_A[None, :] * sp, 0.0), axis=0), mask=cols < H)
        tl.store(ddt_part + pid * H + cols, tl.sum(da, axis=0), mask=cols < H)
    z = tl.arange(0, BZ)
    mz = mr[:, None] & (col_zero + z < C)[None, :]
    tl.store(dproj + r64 * dstride + col_zero + z[None, :], tl.zeros([BR, BZ], dtype=dt), mask=mz)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., C]`` as a ``[N, C]`` view (no copy; the column stride must be 1)."""
    if t.stride(-1) != 1:
        raise ValueError("gates: the projection's channels must be contiguous (stride 1)")
    return t.view(-1, t.shape[-1])


def gates_fwd(
    proj: torch.Tensor, col_b: int, col_a: int | None, H: int, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(beta, g | None)``, float32 ``[*proj.shape[:-1], H]``, from the b (and a) columns of ``proj [..., C]``."""
    p = _rows(proj)
    N = p.shape[0]
    gated = A_log is not None
    beta = torch.empty(*proj.shape[:-1], H, device=proj.device, dtype=torch.float32)
    g = torch.empty_like(beta) if gated else None
    _gates_fwd_kernel[(triton.cdiv(N, BLOCK_ROWS),)](
        p, A_log if gated else beta, dt_bias if gated else beta, beta, g if gated else beta, N, p.stride(0),
        col_b, col_a if gated else 0, H=H, BH=triton.next_power_of_2(H), BR=BLOCK_ROWS, GATED=gated, num_warps=4,
    )  # fmt: skip
    return beta, g


def gates_bwd(
    proj: torch.Tensor,
    col_b: int,
    col_a: int | None,
    H: int,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dbeta: torch.Tensor,
    dg: torch.Tensor | None,
    dproj: torch.Tensor,
    col_zero: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Write the gates' gradients into ``dproj`` (like proj; columns ``col_b``, ``col_a``), zero its columns from
    ``col_zero`` on, and return ``(dA_log, ddt_bias)`` in the parameters' dtypes (None ungated). dbeta, dg float32
    contiguous ``[..., H]``."""
    p, dp = _rows(proj), _rows(dproj)
    N = p.shape[0]
    gated = A_log is not None and dg is not None
    grid = triton.cdiv(N, BLOCK_ROWS)
    parts = torch.empty(2, max(grid, 1), H, device=proj.device, dtype=torch.float32) if gated else dbeta
    _gates_bwd_kernel[(grid,)](
        p, A_log if gated else dbeta, dt_bias if gated else dbeta, dbeta, dg if gated else dbeta, dp,
        parts[0] if gated else dbeta, parts[1] if gated else dbeta, N, p.stride(0), dp.stride(0),
        col_b, col_a if gated else 0, col_zero, p.shape[1],
        H=H, BH=triton.next_power_of_2(H), BR=BLOCK_ROWS, BZ=max(16, triton.next_power_of_2(p.shape[1] - col_zero)),
        GATED=gated, num_warps=4,
    )  # fmt: skip
    if not gated or A_log is None or dt_bias is None:
        return None, None
    return parts[0].sum(0).to(A_log.dtype), parts[1].sum(0).to(dt_bias.dtype)
