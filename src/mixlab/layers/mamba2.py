"""Mamba2 (state-space duality) over :func:`mixlab.ops.ssd`.

Parameter names and shapes follow mamba_ssm's ``Mamba2`` so that its checkpoints map one to one
(``d_inner = expand * d_model``, ``H = d_inner / headdim`` heads, ``G = ngroups``, ``N = d_state``,
``W = d_conv``): ``in_proj`` ``[2*d_inner + 2*G*N + H, d_model]`` (rows: z, x, B, C, dt),
``conv1d.weight`` ``[d_inner + 2*G*N, 1, W]`` and ``conv1d.bias`` (depthwise, over x, B and C),
``dt_bias`` ``[H]``, ``A_log`` ``[H]``, ``D`` ``[H]``, ``norm.weight`` ``[d_inner]``, ``out_proj``
``[d_model, d_inner]``.

Forward: ``z, xBC, dt = in_proj(u)``; ``x, B, C = silu(conv(xBC))``;
``y = ssd(x, dt, -exp(A_log), B, C, D, dt_bias, softplus)`` with ``chunk_size``;
``y = rmsnorm(y * silu(z))`` per group of ``d_inner / G`` channels (``norm_before_gate=False``,
mamba_ssm's default; ``True`` gives ``rmsnorm(y) * silu(z)``); ``out_proj(y)``.
A_log, D and dt_bias are kept in float32 (float64 for a float64 layer) whatever the layer dtype.

Training on the Triton backend runs everything after ``in_proj`` as one custom op,
``mixlab::mamba2_mix_fwd``, that keeps only the in_proj output and the SSD output (with the D skip) for
backward and recomputes the conv, the SSD's ``softplus(dt)`` and the norm output there (as mamba_ssm's fused
Mamba2): 32.6 instead of 57.9 KiB per token and block at the 1.3b widths (``LEAN_MIX``).

Decoding (see :func:`mixlab.layers.common.decode_path`): with a cache, no gradient and few new tokens,
SSD runs as its recurrence on the cached state: on CUDA the conv-update and fused recurrent SSD
Triton kernels, elsewhere a few vectorised PyTorch ops per token (:func:`ssd_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._backend import resolve_backend
from ..ops.conv import causal_conv1d
from ..ops.ssd import ssd
from .base import Mixer
from .common import cached_input, conv_steps, decode_path, inverse_softplus, sample_dt, state_dtype
from .norm import GatedRMSNorm


def ssd_steps(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> torch.Tensor:
    """SSD as its recurrence over a few tokens, updating ``state`` in place (no autograd).

    state ``[b, H, P, N]`` (float32/64, contiguous); x ``[b, T, H, P]``; dt ``[b, T, H]`` (before its
    bias and softplus); A ``[H]``; B, C ``[b, T, G, N]`` (group g serves heads ``g*H/G ..``);
    D ``[H]``; dt_bias ``[H]``. Per token: ``h = exp(dt A) h + dt x B^T``; ``y = h C + D x``.
    Returns ``y [b, T, H, P]`` in the state's dtype.
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    acc = state.dtype
    x, dt, B, C = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    dt = F.softplus(dt)
    # time-major and contiguous: broadcasting ops over strided per-token slices are several times slower
    decay = torch.exp(dt * A.to(acc)).transpose(0, 1).reshape(T, b, H, 1, 1)
    xdt = (x * dt[..., None]).transpose(0, 1).reshape(T, b, G, -1, 1)  # [T, b, G, H/G * P, 1]
    Bt = B.transpose(0, 1).reshape(T, b, G, 1, N)
    Ct = C.transpose(0, 1).reshape(T, b * G, 1, N)
    s_g = state.view(b, G, -1, N)  # heads of a group share B and C
    hT = s_g.view(b * G, -1, N).transpose(1, 2)  # [b*G, N, H/G * P]
    ys = []
    for t in range(T):
        state.mul_(decay[t])
        s_g.addcmul_(xdt[t], Bt[t])
        # C^T h^T, a row times a matrix: bmm is several times slower for the column h C on the CPU
        ys.append(torch.bmm(Ct[t], hT))  # [b*G, 1, H/G * P]
    y = torch.cat(ys, dim=1).view(b, G, T, -1).transpose(1, 2).reshape(b, T, H, P)
    if D is not None:
        y = y + x * D.to(acc)[:, None]
    return y


#: Train through ``mixlab::mamba2_mix_fwd`` (conv → SSD + D → gated norm → out_proj in one op whose
#: backward recomputes the conv, the SSD's dt stage and the norm output) on the Triton path; False: the
#: separate differentiable ops (which save ~25 KiB more per token and block at the 1.3b widths).
LEAN_MIX = True


#: In the lean op's backward, the x channels' conv backward forms the conv output's gradient from SSD's values
#: gradient (``dv·d + D·dO``) and gives the values' dt and D terms on the way, instead of a separate pass over
#: ``[tokens, d_inner]`` writing that gradient (see ``causal_conv1d_bwd_values_into``); needs a power-of-two
#: headdim dividing the conv backward's channel tile, else the separate pass runs.
FOLD_VALUES_INTO_CONV = True


def _mix_split(zxbcdt: torch.Tensor, d_inner: int, conv_dim: int):
    return zxbcdt.split([d_inner, conv_dim, zxbcdt.shape[-1] - d_inner - conv_dim], dim=-1)


def _mix_conv_ssd_inputs(xBC, conv_w, conv_b, conv_cfg, dims):
    """silu(conv(xBC)) split into ``x [B, T, H, P]`` (a view) and contiguous ``q = C``, ``k = B [B, T, G, N]``."""
    from ..ops.conv.triton import causal_conv1d_fwd

    _, _, H, P, G, N, *_ = dims
    b, T, _ = xBC.shape
    xc, _ = causal_conv1d_fwd(xBC, conv_w, conv_b, None, True, conv_cfg)
    xs, Bm, Cm = xc.split([H * P, G * N, G * N], dim=-1)
    return xs.view(b, T, H, P), Cm.reshape(b, T, G, N).contiguous(), Bm.reshape(b, T, G, N).contiguous()


@torch.library.custom_op("mixlab::mamba2_mix_fwd", mutates_args=())
def mamba2_mix_fwd(
    zxbcdt: torch.Tensor,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_w: torch.Tensor,
    out_w: torch.Tensor,
    out_b: torch.Tensor | None,
    dims: list[int],
    eps: float,
    norm_before_gate: bool,
    conv_cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mamba2's mixer after ``in_proj`` on the Triton ops. zxbcdt ``[B, T, 2*d_inner + 2*G*N + H]`` (the
    in_proj output), conv_w ``[C, W]``, A/D/dt_bias ``[H]`` float32, norm_w ``[d_inner]``, out_w
    ``[d_model, d_inner]`` in the matmul dtype; dims ``[d_inner, conv_dim, H, P, G, N]``.
    Returns ``(out [B, T, d_model], y [B, T, H, P], hs)``: y (the SSD output with the D skip) is the only
    token-sized tensor the backward keeps besides zxbcdt; hs, the SSD's segment states (empty unless few long
    sequences, see ``chunk.recompute_segment_chunks``), let its state recompute run in parallel segments."""
    from ..ops.norm_triton import gated_rms_norm_fwd
    from ..ops.ssd.triton.fused import ssd_fused_fwd

    d_inner, conv_dim, G = dims[0], dims[1], dims[4]
    b, T, _ = zxbcdt.shape
    z, xBC, dt = _mix_split(zxbcdt, d_inner, conv_dim)
    with torch.autocast(zxbcdt.device.type, enabled=False):
        xs, q, k = _mix_conv_ssd_inputs(xBC, conv_w, conv_b, conv_cfg, dims)
        y, *_, hs = ssd_fused_fwd(xs, dt, A, q, k, dt_bias, D, None, None, True, False, None)
        # z is read in place from zxbcdt (a row stride of its width)
        o, _ = gated_rms_norm_fwd(
            y.view(b * T, d_inner), z.reshape(b * T, d_inner), norm_w, eps, d_inner // G, norm_before_gate
        )
        out = F.linear(o.view(b, T, d_inner).to(out_w.dtype), out_w, out_b)
    return out, y, hs


@mamba2_mix_fwd.register_fake
def _(zxbcdt, conv_w, conv_b, A, D, dt_bias, norm_w, out_w, out_b, dims, eps, norm_before_gate, conv_cfg):
    from ..ops._triton.chunk import segment_states_shape

    b, T, _ = zxbcdt.shape
    _, _, H, P, _, N, *_ = dims
    y = zxbcdt.new_empty(b, T, H, P)
    hs = zxbcdt.new_empty(segment_states_shape(b, T, H, N, P, packed=False), dtype=torch.float32)
    return zxbcdt.new_empty(b, T, out_w.shape[0], dtype=out_w.dtype), y, hs


@torch.library.custom_op("mixlab::mamba2_mix_bwd", mutates_args=())
def mamba2_mix_bwd(
    zxbcdt: torch.Tensor,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_w: torch.Tensor,
    out_w: torch.Tensor,
    out_b: torch.Tensor | None,
    y: torch.Tensor,
    hs: torch.Tensor,
    dout: torch.Tensor,
    dims: list[int],
    eps: float,
    norm_before_gate: bool,
    conv_cfg: list[int],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:  # fmt: skip
    """Recomputes the conv, the SSD's dt stage (d, g) and the norm output, then runs the ops' backwards.
    Returns the gradients of ``(zxbcdt, conv_w, conv_b | empty, A, D, dt_bias, norm_w, out_w, out_b | empty)``."""
    from ..ops._triton.chunk import chunk_bwd
    from ..ops.conv.triton import (
        causal_conv1d_bwd_into,
        causal_conv1d_bwd_values_into,
        default_config,
        values_fold_fits,
    )
    from ..ops.norm_triton import gated_rms_norm_bwd_into
    from ..ops.ssd.triton.fused import ssd_dt, ssd_dt_bwd, ssd_fused_bwd

    d_inner, conv_dim, H, P, G = dims[:5]
    b, T, _ = zxbcdt.shape
    M = b * T
    z, xBC, dt = _mix_split(zxbcdt, d_inner, conv_dim)
    # The gradient of zxbcdt is written in place, slice by slice (dz by the norm's backward, dxBC by the conv's,
    # one channel range per SSD input), instead of concatenating the pieces: two full-width copies less.
    dzxbcdt = torch.empty(zxbcdt.shape, device=zxbcdt.device, dtype=zxbcdt.dtype)
    dz, dxBC, ddt_out = _mix_split(dzxbcdt, d_inner, conv_dim)
    with torch.autocast(zxbcdt.device.type, enabled=False):
        zc = z.reshape(M, d_inner)  # a view of zxbcdt: the norm kernels take its row stride
        y2 = y.view(M, d_inner)
        dout2 = dout.reshape(M, -1)
        do = dout2.mm(out_w).to(y.dtype)
        # the norm's backward recomputes its output o on the way (for out_proj's weight gradient)
        dy, o = torch.empty_like(y2), torch.empty_like(y2)
        dnw = gated_rms_norm_bwd_into(
            y2, zc, norm_w, None, do, d_inner // G, norm_before_gate, dy, dz.view(M, d_inner), y=o, eps=eps
        )
        del do, zc
        d_out_w = dout2.t().mm(o.to(out_w.dtype))
        d_out_b = dout2.sum(0).to(out_b.dtype) if out_b is not None else zxbcdt.new_empty(0)
        del o
        xs, q, k = _mix_conv_ssd_inputs(xBC, conv_w, conv_b, conv_cfg, dims)
        d, g = ssd_dt(dt, A, dt_bias, True)
        dcw = torch.empty_like(conv_w)
        dcb = torch.empty_like(conv_b) if conv_b is not None else zxbcdt.new_empty(0)
        dy4 = dy.view(b, T, H, P)
        fold = FOLD_VALUES_INTO_CONV and values_fold_fits(P, conv_cfg)
        if fold:  # the x channels' conv backward forms their gradient from SSD's dV (no values pass)
            # xs: a view of the conv output (token stride conv_dim), read in place as the scaled values' x
            dq, dk, dv, _, dg, _ = chunk_bwd(
                q,
                k,
                xs,
                None,
                g,
                1.0,
                None,
                None,
                None,
                None,
                None,
                dy4,
                None,
                False,
                xd=d,
                hs=hs if hs.numel() else None,
            )
            del xs, q, k, g
            dcw[: H * P], db_x, ddx, dD = causal_conv1d_bwd_values_into(
                xBC[..., : H * P], conv_w[: H * P], conv_b[: H * P] if conv_b is not None else None, dv, dy4, d, D,
                conv_cfg, dxBC[..., : H * P],
            )  # fmt: skip
            if conv_b is not None:
                dcb[: H * P] = db_x
            del dv, d, dy, dy4
            dA, dbias = ssd_dt_bwd(ddx, dg, dt, A, dt_bias, True, ddt_out)
            del ddx, dg
        else:
            dx, ddt, dA, dq, dk, dbias, dD, _, _ = ssd_fused_bwd(
                xs, dt, A, q, k, dt_bias, D, None, None, None, d, g, y.new_empty(0), dy4, None, True, hs
            )
            del xs, q, k, d, g, dy, dy4
            ddt_out.copy_(ddt.view(b, T, -1))
        # the conv is depthwise: the x channels and the B, C channels run as separate calls, each reading its own
        # SSD gradient (dk and dq side by side, as B and C are in xBC: one call for both, launched for its own
        # channel count)
        dBC = torch.cat([dk.view(b, T, -1), dq.view(b, T, -1)], dim=-1)
        ranges = ((H * P, conv_dim, dBC, default_config(T, conv_dim - H * P)),)
        del dq, dk
        if not fold:
            ranges = ((0, H * P, dx, conv_cfg), *ranges)
        for lo, hi, dpiece, cfg in ranges:
            dcw[lo:hi], db_piece, _ = causal_conv1d_bwd_into(
                xBC[..., lo:hi], conv_w[lo:hi], conv_b[lo:hi] if conv_b is not None else None, None,
                dpiece.view(b, T, -1), None, True, cfg, dxBC[..., lo:hi],
            )  # fmt: skip
            if conv_b is not None:
                dcb[lo:hi] = db_piece
    return dzxbcdt, dcw, dcb, dA, dD, dbias, dnw, d_out_w, d_out_b


@mamba2_mix_bwd.register_fake
def _(zxbcdt, conv_w, conv_b, A, D, dt_bias, norm_w, out_w, out_b, y, hs, dout, dims, eps, norm_before_gate, conv_cfg):
    e = zxbcdt.new_empty(0)
    return (
        torch.empty_like(zxbcdt, memory_format=torch.contiguous_format),
        torch.empty_like(conv_w),
        torch.empty_like(conv_b) if conv_b is not None else e,
        torch.empty_like(A),
        torch.empty_like(D),
        torch.empty_like(dt_bias),
        torch.empty_like(norm_w),
        torch.empty_like(out_w),
        torch.empty_like(out_b) if out_b is not None else e,
    )


def _mix_setup_context(ctx, inputs, output):
    zxbcdt, conv_w, conv_b, A, D, dt_bias, norm_w, out_w, out_b, dims, eps, norm_before_gate, conv_cfg = inputs
    ctx.save_for_backward(zxbcdt, conv_w, conv_b, A, D, dt_bias, norm_w, out_w, out_b, output[1], output[2])
    ctx.cfg = (dims, eps, norm_before_gate, conv_cfg)
    ctx.set_materialize_grads(False)  # y and hs are outputs only to be saved


def _mix_backward(ctx, dout, _dy, _dhs):
    zxbcdt, conv_w, conv_b, A, D, dt_bias, norm_w, out_w, out_b, y, hs = ctx.saved_tensors
    if dout is None:
        return (None,) * 13
    grads = mamba2_mix_bwd(zxbcdt, conv_w, conv_b, A, D, dt_bias, norm_w, out_w, out_b, y, hs, dout, *ctx.cfg)
    dzxbcdt, dcw, dcb, dA, dD, dbias, dnw, dow, dob = grads
    return (
        dzxbcdt, dcw, dcb if conv_b is not None else None, dA, dD, dbias, dnw, dow, dob if out_b is not None else None,
        None, None, None, None,
    )  # fmt: skip


mamba2_mix_fwd.register_autograd(_mix_backward, setup_context=_mix_setup_context)


@dataclass
class Mamba2Cache:
    """Decode state of a Mamba2 layer (updated in place by the layer's forward).

    ``conv_state``: the last ``d_conv - 1`` conv inputs ``[B, d_inner + 2*G*N, d_conv - 1]`` (layer
    dtype); ``ssm_state``: ``[B, H, headdim, d_state]`` in float32 (float64 for a float64 layer);
    ``pos``: tokens consumed so far (a counter; the math reads the states only).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    pos: int = 0


class Mamba2(Mixer):
    """Mamba2 mixer: ``x [B, T, d_model] -> [B, T, d_model]`` (mamba_ssm's ``Mamba2`` parameterisation)."""

    residual_out_proj = ("out_proj",)

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        norm_before_gate: bool = False,
        chunk_size: int = 256,
        *,
        layer_idx: int | None = None,
        backend: str = "auto",
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        d_inner = int(expand * d_model)
        if d_model <= 0 or d_state <= 0 or headdim <= 0 or ngroups <= 0:
            raise ValueError(
                f"Mamba2: d_model={d_model}, d_state={d_state}, headdim={headdim}, ngroups={ngroups} must be positive"
            )
        if d_inner % headdim != 0:
            raise ValueError(f"Mamba2: expand * d_model = {d_inner} must be a multiple of headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(
                f"Mamba2: the number of heads {nheads} (d_inner / headdim) must be a multiple of ngroups={ngroups}"
            )
        if d_conv < 1:
            raise ValueError(f"Mamba2: d_conv={d_conv} must be >= 1")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2: A_init_range={A_init_range} must satisfy 0 < lo <= hi")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if chunk_size < 1:
            raise ValueError(f"Mamba2: chunk_size={chunk_size} must be positive")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.headdim, self.nheads, self.ngroups = d_inner, headdim, nheads, ngroups
        self.A_init_range = (float(lo), float(hi))
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.norm_before_gate, self.chunk_size = norm_before_gate, chunk_size
        self.layer_idx, self.backend, self.norm_eps = layer_idx, backend, norm_eps
        self.conv_dim = d_inner + 2 * ngroups * d_state

        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias, **kw
        )
        sdt = state_dtype(dtype)
        self.dt_bias = nn.Parameter(torch.empty(nheads, device=device, dtype=sdt))
        self.A_log = nn.Parameter(torch.empty(nheads, device=device, dtype=sdt))
        self.D = nn.Parameter(torch.empty(nheads, device=device, dtype=sdt))
        self.norm = GatedRMSNorm(
            d_inner, eps=norm_eps, group_size=d_inner // ngroups, norm_before_gate=norm_before_gate, **kw
        )
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's init of the conv, dt_bias = softplus^-1 of log-uniform dt in [dt_min, dt_max]
        (floored), A_log = log U(A_init_range) per head, D = 1, norm weight = 1.
        in_proj/out_proj are the model's job."""
        # Flags live on the Parameter objects, which ``to_empty()`` replaces: set them again at every init.
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True
        self.conv1d.reset_parameters()
        dev = self.dt_bias.device
        dt = sample_dt(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor, dev, torch.float32)
        self.dt_bias.copy_(inverse_softplus(dt))
        A = torch.empty(self.nheads, device=dev, dtype=torch.float32).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        self.norm.reset_parameters()

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Mamba2Cache:
        """Zero decode state for ``batch_size`` sequences (its size does not depend on ``max_len``)."""
        p = self.in_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return Mamba2Cache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=state_dtype(dtype)
            ),
        )

    def forward(self, x: torch.Tensor, cache: Mamba2Cache | None = None) -> torch.Tensor:
        """``x [B, T, d_model]``; with ``cache``, continue the cached sequences and update the cache in place."""
        B, T, _ = x.shape
        if cache is not None and cache.ssm_state.shape[0] != B:
            raise ValueError(f"Mamba2: cache was made for batch {cache.ssm_state.shape[0]}, input has batch {B}")
        G, N, H, P = self.ngroups, self.d_state, self.nheads, self.headdim
        zxbcdt = self.in_proj(x)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, H], dim=-1)
        path = decode_path(self, x, cache)
        if path is None and cache is None and self._lean_mix(x):
            return self._mix(zxbcdt, x)
        if path is not None:
            y = self._step(xBC, dt, cache, path)
            return self.out_proj(self.norm(y.reshape(B, T, self.d_inner), z).to(x.dtype))
        keep = cache is not None
        # Triton training path: separate contiguous z, xBC, dt (the conv and the norm save them; views
        # would keep the whole in_proj output alive next to the norm's copy of z).
        lean = not keep and x.dtype != torch.float64 and resolve_backend(self.backend, x) == "triton"
        if lean:
            z, xBC, dt = z.contiguous(), xBC.contiguous(), dt.contiguous()
        xBC, conv_state = causal_conv1d(
            xBC,
            self.conv1d.weight,
            self.conv1d.bias,
            activation="silu",
            initial_state=cached_input(cache.conv_state) if keep else None,
            output_final_state=keep,
        )
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        acc = state_dtype(self.A_log.dtype)
        y, final = ssd(
            xs.reshape(B, T, H, P),
            dt,
            -torch.exp(self.A_log.to(acc)),
            Bm.reshape(B, T, G, N),
            Cm.reshape(B, T, G, N),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            chunk_size=self.chunk_size,
            initial_state=cached_input(cache.ssm_state) if keep else None,
            output_final_state=keep,
            backend=self.backend,
        )
        if keep:
            with torch.no_grad():
                cache.ssm_state.copy_(final)
                cache.conv_state.copy_(conv_state)
            cache.pos += T
        y = self.norm(y.reshape(B, T, self.d_inner), z)
        return self.out_proj(y.to(x.dtype))

    def _lean_mix(self, x: torch.Tensor) -> bool:
        """Train through :func:`mamba2_mix_fwd`: Triton backend, a gradient to compute, conv width 2-4."""
        return (
            LEAN_MIX
            and torch.is_grad_enabled()
            and x.dtype != torch.float64
            and 2 <= self.d_conv <= 4
            and resolve_backend(self.backend, x) == "triton"
        )

    def _mix(self, zxbcdt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The training path after in_proj as one op (see :func:`mamba2_mix_fwd`): zxbcdt ``[B, T, F]``."""
        from ..ops.conv.triton import default_config

        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        mm = amp or x.dtype  # what out_proj(y.to(x.dtype)) multiplies in
        w, b = self.out_proj.weight, self.out_proj.bias
        acc = state_dtype(self.A_log.dtype)
        T = zxbcdt.shape[1]
        with torch.autocast(dev, enabled=False):
            out, *_ = mamba2_mix_fwd(
                zxbcdt,
                self.conv1d.weight.squeeze(1),
                self.conv1d.bias,
                -torch.exp(self.A_log.to(acc)),
                self.D,
                self.dt_bias,
                self.norm.weight,
                w.to(mm),
                b.to(mm) if b is not None else None,
                [self.d_inner, self.conv_dim, self.nheads, self.headdim, self.ngroups, self.d_state],
                float(self.norm.eps),
                bool(self.norm_before_gate),
                default_config(T, self.conv_dim),
            )
        return out

    def _step(self, xBC: torch.Tensor, dt: torch.Tensor, cache: Mamba2Cache, path: str) -> torch.Tensor:
        """The cached SSD as a direct recurrence (no autograd), states updated in place: ``"triton"`` runs
        the conv-update (one token) or conv kernel and the fused recurrent SSD kernel, ``"plain"`` the
        PyTorch :func:`~mixlab.layers.common.conv_steps` and :func:`ssd_steps`.
        xBC ``[B, T, conv_dim]``, dt ``[B, T, H]`` -> y ``[B, T, H, P]``."""
        B, T, _ = xBC.shape
        G, N, H, P = self.ngroups, self.d_state, self.nheads, self.headdim
        w, bias = self.conv1d.weight, self.conv1d.bias
        if path == "triton" and T == 1 and 2 <= self.d_conv <= 4:  # the conv kernel's widths
            from ..ops.conv.triton import causal_conv1d_update_triton

            xBC = causal_conv1d_update_triton(xBC[:, 0], cache.conv_state, w, bias, "silu")[:, None]
        elif path == "plain":
            xBC = conv_steps(xBC, cache.conv_state, w, bias)
        else:
            xBC, conv_state = causal_conv1d(xBC, w, bias, "silu", cache.conv_state, output_final_state=True)
            cache.conv_state.copy_(conv_state)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs, Bm, Cm = xs.reshape(B, T, H, P), Bm.reshape(B, T, G, N), Cm.reshape(B, T, G, N)
        A = -torch.exp(self.A_log.to(state_dtype(self.A_log.dtype)))
        if path == "triton":
            from ..ops.ssd.triton import ssd_recurrent_triton

            y, final = ssd_recurrent_triton(
                xs, dt, A, Bm, Cm, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, initial_state=cache.ssm_state
            )
            cache.ssm_state.copy_(final)
        else:
            y = ssd_steps(cache.ssm_state, xs, dt, A, Bm, Cm, self.D, self.dt_bias)
        cache.pos += T
        return y

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
            f"ngroups={self.ngroups}, d_state={self.d_state}, chunk_size={self.chunk_size}, backend={self.backend!r}"
        )


__all__ = ["Mamba2", "Mamba2Cache", "ssd_steps"]
