"""DeltaNet and Gated DeltaNet mixers over :func:`mixlab.ops.delta_rule`.

Parameter names and shapes follow fla's ``DeltaNet`` / ``GatedDeltaNet`` layers so that their
checkpoints map one to one: ``q_proj``, ``k_proj`` ``[H*K, d]``, ``v_proj`` ``[H*V, d]``, ``b_proj``
``[H, d]``, ``q_conv1d.weight``/``k_conv1d.weight``/``v_conv1d.weight`` ``[C, 1, W]`` (depthwise, no
bias), ``o_norm.weight`` ``[V]`` (one norm shared by every head), ``o_proj`` ``[d, H*V]``; Gated
DeltaNet adds ``a_proj`` ``[H, d]``, ``A_log`` ``[H]``, ``dt_bias`` ``[H]`` and ``g_proj`` ``[H*V, d]``.

Forward, per token (K = ``head_dim``, V = ``head_dim * expand_v``):
``q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))``; q, k L2-normalised per head;
``beta = sigmoid(x W_b)``; (Gated) ``g = -exp(A_log) * softplus(x W_a + dt_bias)``; the delta rule
with scale ``K ** -0.5``; per-head RMSNorm of the output, times ``silu(x W_g)`` when gated;
``o_proj``.

Training on the Triton backend (no cache) runs q, k, v, b (and a) as one GEMM (:func:`_in_projection`) and
two lean custom ops (:func:`_lean_qkv_delta`, :func:`_lean_norm_out`) that save the projection's output
instead of the convs' and L2 norms' results and the gates, and the output norm's inputs instead of its
result: their backward recomputes the gates, conv -> SiLU -> L2 norm and the norm (the same kernels; the L2
norm as the fused RMSNorm kernel) and writes the whole projection's gradient, so the gradients are the
unfused path's up to float rounding. For q and k (K a power of two in 64..256) conv -> SiLU -> L2 norm is
one kernel each way (:mod:`mixlab.ops.conv.triton_l2`, switch :data:`FUSED_CONV_L2`).

Decoding (see :func:`mixlab.layers.common.decode_path`): with a cache, no gradient and few new tokens,
the delta rule runs as its recurrence on the cached state: on CUDA the conv-update and fused
recurrent delta-rule Triton kernels, elsewhere a few PyTorch ops per token (:func:`delta_rule_steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._backend import resolve_backend
from ..ops.conv import causal_conv1d
from ..ops.delta_rule import delta_rule
from .base import Mixer
from .common import cached_input, conv_steps, decode_path, inverse_softplus, sample_dt
from .norm import GatedRMSNorm, RMSNorm

# fla's l2norm epsilon (inside the square root), kept so that imported checkpoints compute the same.
L2_EPS = 1e-6
#: the lean path runs q/k's conv -> SiLU -> L2 norm as one kernel (mixlab.ops.conv.triton_l2) where K is a
#: power of two in 64..256 and W in 2..4; False: the conv kernel, then the RMSNorm kernel as L2 norm (to compare)
FUSED_CONV_L2 = True


class _L2Norm(torch.autograd.Function):
    """:func:`l2_normalize` saving its output and ``rstd [..., 1]`` (the delta rule saves the output
    anyway) instead of a float32 copy of its input: ``dx = rstd (dy - y sum(dy y))``."""

    @staticmethod
    def forward(ctx, x, eps):  # type: ignore[override]
        xf = x if x.dtype == torch.float64 else x.float()
        rstd = torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)
        y = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        y, rstd = ctx.saved_tensors
        yf, dyf = y.to(rstd.dtype), dy.to(rstd.dtype)
        return (rstd * (dyf - yf * (dyf * yf).sum(-1, keepdim=True))).to(y.dtype), None


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in float32 (float64 for float64), cast back."""
    if torch.is_grad_enabled() and x.requires_grad:
        with torch.autocast(x.device.type, enabled=False):
            return _L2Norm.apply(x, eps)
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------ lean Triton training path
# Two torch.library custom ops (opaque to torch.compile, so its partitioner cannot decide to keep the
# recomputed tensors instead) whose backward ops recompute what the forward did not save.


def _l2_weight(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[-1],), x.shape[-1] ** -0.5, device=x.device, dtype=torch.float32)


def _l2_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`l2_normalize` of x ``[..., K]`` (contiguous) in one fused kernel, the RMSNorm one with
    weight ``K^-1/2`` and eps ``L2_EPS / K`` (the same function: ``x / sqrt(sum x^2 + eps)``; for a
    power-of-4 K the scalings are exact, the sums' order differs). Returns ``(y, rstd [N, 1])``."""
    from ..ops.norm_triton import gated_rms_norm_fwd

    K = x.shape[-1]
    y, rstd = gated_rms_norm_fwd(x.view(-1, K), None, _l2_weight(x), L2_EPS / K, K, False)
    return y.view(x.shape), rstd


def _l2_bwd(x: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The backward of :func:`_l2_fwd` from its input x and rstd."""
    from ..ops.norm_triton import gated_rms_norm_bwd

    K = x.shape[-1]
    return gated_rms_norm_bwd(x.view(-1, K), None, _l2_weight(x), rstd, dy.reshape(-1, K), K, False)[0].view(x.shape)


def _conv_cfg(x: torch.Tensor) -> list[int]:
    from ..ops.conv.triton import default_config

    return default_config(x.shape[1], x.shape[2])


def _fused_conv_l2(p: torch.Tensor, w: torch.Tensor, n_heads: int) -> bool:
    """Whether q/k of this shape take the fused conv -> SiLU -> L2 kernels (:data:`FUSED_CONV_L2`, K, W)."""
    from ..ops.conv.triton_l2 import supported

    return FUSED_CONV_L2 and supported(p.shape[-1] // n_heads, w.shape[-1])


def _split_qkv(qkv: torch.Tensor, wq: torch.Tensor, wv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of q, k ``[B, T, H*K]`` and v ``[B, T, H*V]`` in the fused projection ``qkv`` (its first channels: q | k | v)."""
    dk, dv = wq.shape[0], wv.shape[0]
    return qkv[..., :dk], qkv[..., dk : 2 * dk], qkv[..., 2 * dk : 2 * dk + dv]


def _lean_inputs(qkv, wq, wk, wv, n_heads):
    """``silu(conv(.))`` of the projections ``[B, T, H, D]``, q and k L2-normed per head:
    ``(q, k, v, (q before the norm, its rstd), (k before the norm, its rstd))``; the two pairs are None
    on the fused path (its backward recomputes them)."""
    from ..ops.conv.triton import causal_conv1d_fwd
    from ..ops.conv.triton_l2 import conv_silu_l2_fwd

    qp, kp, vp = _split_qkv(qkv, wq, wv)
    B, T, _ = qp.shape
    vc = causal_conv1d_fwd(vp, wv, None, None, True, _conv_cfg(vp))[0].view(B, T, n_heads, -1)
    if _fused_conv_l2(qp, wq, n_heads):
        return conv_silu_l2_fwd(qp, wq, n_heads, L2_EPS), conv_silu_l2_fwd(kp, wk, n_heads, L2_EPS), vc, None, None
    qc, kc = (
        causal_conv1d_fwd(p, w, None, None, True, _conv_cfg(p))[0].view(B, T, n_heads, -1)
        for p, w in ((qp, wq), (kp, wk))
    )
    (q, rq), (k, rk) = _l2_fwd(qc), _l2_fwd(kc)
    return q, k, vc, (qc, rq), (kc, rk)


def _gate_columns(wq: torch.Tensor, wv: torch.Tensor, n_heads: int, gated: bool) -> tuple[int, int | None, int]:
    """Where :func:`_in_projection` puts the gates: ``(col_b, col_a | None, col_pad)``, b's first channel, a's (gated),
    and the first padding channel; q | k | v come first (:func:`_split_qkv`)."""
    col_b = 2 * wq.shape[0] + wv.shape[0]
    col_a = col_b + n_heads if gated else None
    return col_b, col_a, col_b + n_heads * (2 if gated else 1)


@torch.library.custom_op("mixlab::deltanet_lean_fwd", mutates_args=())
def _lean_fwd(
    proj: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    n_heads: int,
    scale: float,
    keep_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj ``[B, T, C]`` (the fused input projection, contiguous: q | k | v | b [| a] | zero padding, see
    :func:`_in_projection`), conv weights ``[C, W]``, A_log / dt_bias ``[H]`` (gated) or None -> ``(o [B, T, H,
    V], Tm, w, u, h, vn, hs)``: the delta op's outputs (see ``mixlab::chunk_gated_delta_fwd``); h and vn are
    empty unless ``keep_states`` (see :attr:`DeltaNet.keep_states`)."""
    from ..ops._triton.ops import chunk_gated_delta_fwd
    from ..ops.delta_rule.gates_triton import gates_fwd

    col_b, col_a, _ = _gate_columns(wq, wv, n_heads, A_log is not None)
    with torch.autocast(proj.device.type, enabled=False):
        beta, g = gates_fwd(proj, col_b, col_a, n_heads, A_log, dt_bias)
        q, k, v, _, _ = _lean_inputs(proj, wq, wk, wv, n_heads)
        o, _, Tm, w, u, h, vn, hs = chunk_gated_delta_fwd(q, k, v, beta, g, scale, None, False, None, True, keep_states)
    return o, Tm, w, u, h, vn, hs


@_lean_fwd.register_fake
def _(proj, wq, wk, wv, A_log, dt_bias, n_heads, scale, keep_states=False):
    from ..ops._triton.ops import chunk_gated_delta_fwd

    B, T, _ = proj.shape
    q = proj.new_empty(B, T, n_heads, wq.shape[0] // n_heads)
    v = proj.new_empty(B, T, n_heads, wv.shape[0] // n_heads)
    gate = proj.new_empty(B, T, n_heads, dtype=torch.float32)
    o, _, Tm, w, u, h, vn, hs = chunk_gated_delta_fwd(
        q, q, v, gate, gate if A_log is not None else None, scale, None, False, None, True, keep_states
    )
    return o, Tm, w, u, h, vn, hs


@torch.library.custom_op("mixlab::deltanet_lean_bwd", mutates_args=())
def _lean_bwd(
    proj: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    Tm: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    vn: torch.Tensor,
    hs: torch.Tensor,
    do: torch.Tensor,
    n_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the gates and conv -> SiLU -> L2 norm, then the delta op's, the L2 norms' and the convs' backward.
    Returns ``(dproj, dwq, dwk, dwv, dA_log | empty, ddt_bias | empty)``. dproj is the whole projection's gradient:
    the convs' backwards write their dx straight into its q | k | v slices, the gates' gradients go to theirs and
    the padding's are zero (one input-gradient GEMM for every projection, no concatenation or sum)."""
    from ..ops._triton.ops import chunk_gated_delta_bwd
    from ..ops.conv.triton import causal_conv1d_bwd_into
    from ..ops.conv.triton_l2 import conv_silu_l2_bwd_into
    from ..ops.delta_rule.gates_triton import gates_bwd, gates_fwd

    keep = h.numel() > 0
    col_b, col_a, col_pad = _gate_columns(wq, wv, n_heads, A_log is not None)
    qp, kp, vp = _split_qkv(proj, wq, wv)
    dproj = torch.empty(proj.shape, device=proj.device, dtype=proj.dtype)
    dqp, dkp, dvp = _split_qkv(dproj, wq, wv)
    with torch.autocast(proj.device.type, enabled=False):
        beta, g = gates_fwd(proj, col_b, col_a, n_heads, A_log, dt_bias)
        q, k, v, qn, kn = _lean_inputs(proj, wq, wk, wv, n_heads)
        dq, dk, dv, dbeta, dg, _ = chunk_gated_delta_bwd(
            q,
            k,
            v,
            beta,
            g,
            scale,
            None,
            None,
            Tm,
            w,
            u,
            do,
            None,
            True,
            h if keep else None,
            vn if keep else None,
            hs if hs.numel() else None,
        )
        del q, k, v
        if qn is None:
            dwq = conv_silu_l2_bwd_into(qp, wq, dq, n_heads, dqp, L2_EPS)
            dwk = conv_silu_l2_bwd_into(kp, wk, dk, n_heads, dkp, L2_EPS)
        else:
            dq, dk = _l2_bwd(*qn, dq).flatten(2), _l2_bwd(*kn, dk).flatten(2)
            del qn, kn
            dwq, _, _ = causal_conv1d_bwd_into(qp, wq, None, None, dq, None, True, _conv_cfg(qp), dqp)
            dwk, _, _ = causal_conv1d_bwd_into(kp, wk, None, None, dk, None, True, _conv_cfg(kp), dkp)
        dwv, _, _ = causal_conv1d_bwd_into(vp, wv, None, None, dv.flatten(2), None, True, _conv_cfg(vp), dvp)
        # the gates' columns, and zeros in the padding's (their weight rows are zero, but dproj @ W must not meet NaN)
        dA_log, ddt_bias = gates_bwd(proj, col_b, col_a, n_heads, A_log, dt_bias, dbeta, dg, dproj, col_pad)
    if dA_log is None or ddt_bias is None:  # ungated: two distinct empty outputs (outputs may not alias)
        dA_log, ddt_bias = proj.new_empty(0), proj.new_empty(0)
    return dproj, dwq, dwk, dwv, dA_log, ddt_bias


@_lean_bwd.register_fake
def _(proj, wq, wk, wv, A_log, dt_bias, Tm, w, u, h, vn, hs, do, n_heads, scale):
    like = torch.empty_like
    return (
        like(proj, memory_format=torch.contiguous_format),
        like(wq),
        like(wk),
        like(wv),
        like(A_log) if A_log is not None else proj.new_empty(0),
        like(dt_bias) if dt_bias is not None else proj.new_empty(0),
    )


def _lean_fwd_setup(ctx, inputs, output):
    proj, wq, wk, wv, A_log, dt_bias, n_heads, scale, *_ = inputs
    _, Tm, w, u, h, vn, hs = output
    ctx.set_materialize_grads(False)  # Tm, w, u, h, vn, hs feed only the backward
    ctx.save_for_backward(proj, wq, wk, wv, A_log, dt_bias, Tm, w, u, h, vn, hs)
    ctx.cfg = (n_heads, scale)


def _lean_fwd_backward(ctx, do, *_):
    proj, wq, wk, wv, A_log, dt_bias, Tm, w, u, h, vn, hs = ctx.saved_tensors
    if do is None:
        return (None,) * 9
    dproj, dwq, dwk, dwv, dA_log, ddt_bias = _lean_bwd(
        proj, wq, wk, wv, A_log, dt_bias, Tm, w, u, h, vn, hs, do.contiguous(), *ctx.cfg
    )
    gated = A_log is not None
    return dproj, dwq, dwk, dwv, dA_log if gated else None, ddt_bias if gated else None, None, None, None


_lean_fwd.register_autograd(_lean_fwd_backward, setup_context=_lean_fwd_setup)


#: the fused input projection's width is padded to a multiple of this many channels (128 bytes in bf16). Rows of
#: another width make torch.compile pad the GEMM output's row stride to 128 bytes (``comprehensive_padding``), and
#: the custom op's contiguous input then costs a copy each way (H100, 1.3b Gated DeltaNet at 6,160 channels: 5.5 ms
#: forward and 5.6 ms backward per step)
PROJ_ALIGN = 64


def _in_projection(layer: DeltaNet, x: torch.Tensor) -> torch.Tensor:
    """``x [B, T, d_model]`` through q_proj, k_proj, v_proj, b_proj (and a_proj, gated) as one GEMM against their
    concatenated weights (the parameters stay separate) -> ``[B, T, C]``, channels q | k | v | b [| a] | zeros up to
    a multiple of :data:`PROJ_ALIGN`. x is read once, and backward has one input-gradient GEMM (and one weight
    GEMM) instead of one per projection plus their sum; the narrow b / a projections alone cost as much as
    a wide one (H100, 1.3b Gated DeltaNet: 9.8 ms of a 631 ms step)."""
    ws = [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.b_proj.weight]
    if layer._gated_decay:
        ws.append(layer.a_proj.weight)
    pad = -sum(w.shape[0] for w in ws) % PROJ_ALIGN
    if pad:
        ws.append(ws[0].new_zeros(pad, ws[0].shape[1]))
    return F.linear(x, torch.cat(ws))


def _lean_qkv_delta(layer: DeltaNet, proj: torch.Tensor, scale: float) -> torch.Tensor:
    """``delta_rule(l2(silu(conv(q))), l2(silu(conv(k))), silu(conv(v)), beta, g)`` of the fused projection
    ``proj [B, T, C]`` (see :func:`_in_projection`), the gates computed from its b / a columns, saving proj (and
    the delta op's Tm, w, u) for backward -> o ``[B, T, H, V]``."""
    gated = layer._gated_decay
    o, *_ = _lean_fwd(
        proj.contiguous(),
        *(c.weight.squeeze(1).contiguous() for c in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)),
        layer.A_log if gated else None,
        layer.dt_bias if gated else None,
        layer.n_heads,
        float(scale),
        bool(layer.keep_states),
    )
    return o


@torch.library.custom_op("mixlab::deltanet_norm_out_fwd", mutates_args=())
def _norm_out_fwd(
    o: torch.Tensor, z: torch.Tensor | None, norm_w: torch.Tensor, out_w: torch.Tensor, eps: float
) -> torch.Tensor:
    """``norm(o) [* silu(z)]`` per head, then ``@ out_w.T`` in out_w's dtype. o, z ``[B, T, H*V]``
    contiguous, norm_w ``[V]``, out_w ``[d, H*V]`` -> out ``[B, T, d]``."""
    from ..ops.norm_triton import gated_rms_norm_fwd

    V = norm_w.shape[0]
    with torch.autocast(o.device.type, enabled=False):
        y, _ = gated_rms_norm_fwd(
            o.view(-1, V), z.view(-1, V) if z is not None else None, norm_w, eps, V, z is not None
        )
        return F.linear(y.view(o.shape).to(out_w.dtype), out_w)


@_norm_out_fwd.register_fake
def _(o, z, norm_w, out_w, eps):
    return o.new_empty(*o.shape[:-1], out_w.shape[0], dtype=out_w.dtype)


@torch.library.custom_op("mixlab::deltanet_norm_out_bwd", mutates_args=())
def _norm_out_bwd(
    o: torch.Tensor,
    z: torch.Tensor | None,
    norm_w: torch.Tensor,
    out_w: torch.Tensor,
    dout: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matmul's input gradient, then the norm's backward, which also writes the norm's output again (one pass
    over o and z), then the matmul's weight gradient: ``(do, dz | empty, dnorm_w, dout_w)``. The products are the
    ones autograd runs for ``F.linear`` of a 3-D input."""
    from ..ops.norm_triton import gated_rms_norm_bwd_into

    V = norm_w.shape[0]
    o2, z2 = o.view(-1, V), z.view(-1, V) if z is not None else None
    with torch.autocast(o.device.type, enabled=False):
        d2 = dout.view(-1, dout.shape[-1])
        dy = d2.mm(out_w).to(o.dtype)
        do = torch.empty_like(o)
        dz = torch.empty_like(z) if z is not None else o.new_empty(0)
        y = torch.empty_like(o2)
        dnw = gated_rms_norm_bwd_into(
            o2, z2, norm_w, None, dy.view(-1, V), V, z is not None, do.view(-1, V),
            dz.view(-1, V) if z is not None else dz, y=y, eps=eps,
        )  # fmt: skip
        del dy
        dw = d2.t().mm(y.view(-1, o.shape[-1]).to(out_w.dtype))
    return do, dz, dnw, dw


@_norm_out_bwd.register_fake
def _(o, z, norm_w, out_w, dout, eps):
    like = torch.empty_like
    return like(o), like(z) if z is not None else o.new_empty(0), like(norm_w), like(out_w)


def _norm_out_setup(ctx, inputs, output):
    o, z, norm_w, out_w, eps = inputs
    ctx.save_for_backward(o, z, norm_w, out_w)
    ctx.eps = eps


def _norm_out_backward(ctx, dout):
    o, z, norm_w, out_w = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    do, dz, dnw, dw = _norm_out_bwd(o, z, norm_w, out_w, dout.contiguous(), ctx.eps)
    return do, dz if z is not None else None, dnw, dw, None


_norm_out_fwd.register_autograd(_norm_out_backward, setup_context=_norm_out_setup)


def _lean_norm_out(layer: DeltaNet, o: torch.Tensor, z: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``o_proj(o_norm(o[, z]))`` keeping o and z for backward but not the norm's output.
    o ``[B, T, H, V]``, z ``[B, T, H*V]`` | None -> ``[B, T, d_model]`` (dtype as the unfused o_proj)."""
    B, T = o.shape[:2]
    amp = _compute_dtype(x)
    return _norm_out_fwd(
        o.reshape(B, T, layer.value_dim).contiguous(),
        z.contiguous() if z is not None else None,
        layer.o_norm.weight,
        layer.o_proj.weight.to(amp),
        float(layer.o_norm.eps),
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``o_proj`` computes in for the layer input ``x``: autocast's, else x's."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def delta_rule_steps(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The (gated) delta rule as its recurrence over a few tokens, updating ``state`` in place (no autograd).

    state ``[b, H, K, V]`` (float32/64, contiguous); q, k ``[b, T, H, K]``; v ``[b, T, H, V]``;
    beta, g ``[b, T, H]`` (g a log-decay, or None). Per token, as the reference:
    ``S = exp(g) S;  u = beta (v - S^T k);  S += k u^T;  o = scale S^T q``. Returns ``o [b, T, H, V]``
    in the state's dtype.
    """
    b, T, H, K = q.shape
    V = v.shape[-1]
    acc = state.dtype
    # time-major rows [T, b*H, 1, D]: every per-token slice is one contiguous block
    qT, kT, vT = ((t.to(acc) * c).transpose(0, 1).reshape(T, b * H, 1, -1) for t, c in ((q, scale), (k, 1), (v, 1)))
    betaT = beta.to(acc).transpose(0, 1).reshape(T, b * H, 1, 1)
    if g is not None:
        decay = g.to(acc).exp().transpose(0, 1).reshape(T, b * H, 1, 1)
    S = state.view(b * H, K, V)
    os = []
    for t in range(T):
        if g is not None:
            S.mul_(decay[t])
        u = (vT[t] - torch.bmm(kT[t], S)).mul_(betaT[t])  # beta (v - S^T k)
        S.baddbmm_(kT[t].transpose(1, 2), u)  # S += k u^T
        os.append(torch.bmm(qT[t], S))  # [b*H, 1, V]
    return torch.cat(os, dim=1).view(b, H, T, V).transpose(1, 2)


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time with a SiLU, holding an ``nn.Conv1d``-shaped weight
    ``[C, 1, W]`` (no bias) so that state dicts match fla's ``ShortConvolution``."""

    def __init__(self, channels: int, kernel_size: int, device=None, dtype=None) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size (conv_size) must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = W.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, output_final_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[B, T, C]``, state ``[B, C, W-1]`` (the previous inputs) -> ``(silu(conv(x)), new state | None)``."""
        return causal_conv1d(x, self.weight, None, "silu", initial_state=state, output_final_state=output_final_state)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"


@dataclass
class DeltaNetCache:
    """Decode state of a DeltaNet / Gated DeltaNet layer (updated in place by the layer's forward).

    ``conv_q``, ``conv_k`` ``[B, H*K, W-1]`` and ``conv_v`` ``[B, H*V, W-1]``: the last inputs of the
    short convolutions (None without them). ``state``: the delta-rule memory ``[B, H, K, V]``,
    float32 (float64 for a float64 layer). ``pos``: tokens consumed so far. Carries no gradient.
    """

    conv_q: torch.Tensor | None
    conv_k: torch.Tensor | None
    conv_v: torch.Tensor | None
    state: torch.Tensor
    pos: int = 0


class DeltaNet(Mixer):
    """DeltaNet: linear attention whose memory is written by the delta rule (beta-weighted error correction).

    ``x [B, T, d_model] -> [B, T, d_model]``. ``use_output_gate`` multiplies the normed output by
    ``silu(x W_g)`` (adds ``g_proj``). ``chunk_size`` is the chunk of the chunked/Triton backends.
    """

    residual_out_proj = ("o_proj",)
    _gated_decay = False
    #: take the lean custom ops on the Triton training path (False: the unfused ops, e.g. to compare)
    lean = True
    #: on the lean training path, keep the delta rule's chunk states h and V_new from forward to backward instead
    #: of recomputing them there: one sequential pass less per layer and step, for ``(K·V/64 + V)·H`` more values
    #: per token in the compute dtype (K, V head dims, 64-token chunks). Set from outside by the trainer
    #: (``train.keep_states``, :func:`mixlab.train.parallel.apply_state_keeping`, where :meth:`keeping_states_pays`);
    #: an instance attribute overrides it.
    keep_states = False

    def keeping_states_pays(self) -> bool:
        """Whether :attr:`keep_states` saves time: where the forward runs unfused anyway (K above the fused
        kernel's limit, 128). Below it, keeping the states would trade the fused forward for the unfused one, which
        costs about what the backward's recompute did (H100, Gated DeltaNet 350m, K 128: 157.2K → 154.6K tokens/s
        at 2K×16, 153.8K → 149.5K at 8K×4; benchmarks/NOTES-kernels.md v15)."""
        from ..ops._triton.chunk import fused_forward

        return not fused_forward(self.head_dim)

    def kept_state_bytes_per_token(self, element_bytes: int = 2) -> float:
        """Bytes per token that :attr:`keep_states` holds from forward to backward: h (``K·V`` per head and
        64-token chunk) and V_new (``V`` per head and token), in elements of ``element_bytes``."""
        return (self.head_dim * self.head_v_dim / 64 + self.head_v_dim) * self.n_heads * element_bytes

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        head_dim: int = 64,
        expand_v: float = 1.0,
        conv_size: int = 4,
        use_short_conv: bool = True,
        use_output_gate: bool = False,
        chunk_size: int = 64,
        *,
        layer_idx: int | None = None,
        backend: str = "auto",
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._build(
            d_model,
            n_heads,
            head_dim,
            expand_v,
            conv_size,
            use_short_conv,
            use_output_gate,
            chunk_size,
            layer_idx,
            backend,
            norm_eps,
            device,
            dtype,
        )
        self.reset_parameters()

    def _build(
        self,
        d_model,
        n_heads,
        head_dim,
        expand_v,
        conv_size,
        use_short_conv,
        use_output_gate,
        chunk_size,
        layer_idx,
        backend,
        norm_eps,
        device,
        dtype,
    ) -> None:
        name = type(self).__name__
        if n_heads <= 0 or head_dim <= 0:
            raise ValueError(f"{name}: n_heads={n_heads} and head_dim={head_dim} must be positive")
        if not float(head_dim * expand_v).is_integer() or head_dim * expand_v <= 0:
            raise ValueError(f"{name}: head_dim * expand_v = {head_dim * expand_v} must be a positive integer")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.key_dim, self.value_dim = n_heads * head_dim, n_heads * self.head_v_dim
        self.expand_v, self.conv_size, self.use_short_conv = expand_v, conv_size, use_short_conv
        self.use_output_gate, self.chunk_size = use_output_gate, chunk_size
        self.layer_idx, self.backend, self.norm_eps = layer_idx, backend, norm_eps

        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False, **kw)
        if self._gated_decay:
            self.a_proj = nn.Linear(d_model, n_heads, bias=False, **kw)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False, **kw)
        if self._gated_decay:
            self.A_log = nn.Parameter(torch.empty(n_heads, **kw))
            self.A_log._no_weight_decay = True
            self.dt_bias = nn.Parameter(torch.empty(n_heads, **kw))
            self.dt_bias._no_weight_decay = True
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, **kw)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, **kw)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, **kw)
        if use_output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False, **kw)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, norm_before_gate=True, **kw)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, **kw)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False, **kw)

    def reset_parameters(self) -> None:
        """Init the convs and the output norm (and, gated, A_log and dt_bias); Linear weights are the model's job."""
        if self.use_short_conv:
            for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
                conv.reset_parameters()
        self.o_norm.reset_parameters()

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DeltaNetCache:
        """Zero decode state for ``batch_size`` sequences (its size does not depend on ``max_len``)."""
        p = self.q_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        W1 = self.conv_size - 1

        def conv(c: int) -> torch.Tensor | None:
            return torch.zeros(batch_size, c, W1, device=device, dtype=dtype) if self.use_short_conv else None

        return DeltaNetCache(
            conv_q=conv(self.key_dim),
            conv_k=conv(self.key_dim),
            conv_v=conv(self.value_dim),
            state=torch.zeros(
                batch_size, self.n_heads, self.head_dim, self.head_v_dim, device=device, dtype=state_dtype
            ),
        )

    def _decay(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def _short_convs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DeltaNetCache | None, path: str | None
    ) -> tuple[torch.Tensor, ...]:
        """``silu(conv(.))`` of q, k, v ``[B, T, C]``, continuing (and updating in place) the cached windows:
        one token with the Triton conv-update kernel on the ``"triton"`` path, :func:`conv_steps` on the
        ``"plain"`` one, the conv op otherwise."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        if cache is None:
            return tuple(conv(t)[0] for conv, t in zip(convs, (q, k, v)))
        out = []
        for conv, t, window in zip(convs, (q, k, v), (cache.conv_q, cache.conv_k, cache.conv_v)):
            if path == "triton" and t.shape[1] == 1 and 2 <= self.conv_size <= 4:  # the kernel's widths
                from ..ops.conv.triton import causal_conv1d_update_triton

                y = causal_conv1d_update_triton(t[:, 0], window, conv.weight, None, "silu")[:, None]
            elif path == "plain":
                y = conv_steps(t, window, conv.weight, None)
            else:
                y, new_window = conv(t, cached_input(window), True)
                with torch.no_grad():
                    window.copy_(new_window)
            out.append(y)
        return tuple(out)

    def _lean_ok(self, x: torch.Tensor, cache: DeltaNetCache | None) -> bool:
        """Whether ``forward`` takes the lean custom ops: training (no cache, grad mode on) on the Triton
        backend with the short convs the conv kernel takes (widths 2-4), not float64."""
        return (
            self.lean
            and cache is None
            and torch.is_grad_enabled()
            and self.use_short_conv
            and 2 <= self.conv_size <= 4
            and x.dtype != torch.float64
            and x.shape[1] > 0
            and resolve_backend(self.backend, x) == "triton"
        )

    def forward(self, x: torch.Tensor, cache: DeltaNetCache | None = None) -> torch.Tensor:
        """``x [B, T, d_model]``; with ``cache``, continue the cached sequences and update the cache in place."""
        B, T, _ = x.shape
        if cache is not None and cache.state.shape[0] != B:
            raise ValueError(
                f"{type(self).__name__}: cache was made for batch {cache.state.shape[0]}, input has batch {B}"
            )
        path = decode_path(self, x, cache)
        if self._lean_ok(x, cache):
            o = _lean_qkv_delta(self, _in_projection(self, x), self.head_dim**-0.5)
            return _lean_norm_out(self, o, self.g_proj(x) if self.use_output_gate else None, x)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self._short_convs(q, k, v, cache, path)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = l2_normalize(q.view(B, T, self.n_heads, self.head_dim))
        k = l2_normalize(k.view(B, T, self.n_heads, self.head_dim))
        v = v.view(B, T, self.n_heads, self.head_v_dim)
        beta = torch.sigmoid(_acc(self.b_proj(x)))
        g, scale = self._decay(x), self.head_dim**-0.5
        if path == "plain":  # the cached state is updated in place
            o = delta_rule_steps(cache.state, q, k, v, beta, g, scale).to(q.dtype)
        elif path == "triton":
            from ..ops.delta_rule.triton import delta_rule_recurrent_triton

            o, state = delta_rule_recurrent_triton(q, k, v, beta, g, scale=scale, initial_state=cache.state)
            cache.state.copy_(state)
        else:
            o, state = delta_rule(
                q,
                k,
                v,
                beta,
                g,
                scale=scale,
                initial_state=cached_input(cache.state) if cache is not None else None,
                output_final_state=cache is not None,
                chunk_size=self.chunk_size,
                backend=self.backend,
            )
            if cache is not None:
                with torch.no_grad():
                    cache.state.copy_(state)
        if cache is not None:
            cache.pos += T
        if self.use_output_gate:
            o = self.o_norm(o, self.g_proj(x).view(B, T, self.n_heads, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, self.value_dim).to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, head_dim={self.head_dim}, head_v_dim={self.head_v_dim}, "
            f"conv_size={self.conv_size if self.use_short_conv else None}, backend={self.backend!r}"
        )


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet with a per-head, data-dependent decay of the memory and an output gate.

    ``g = -exp(A_log) * softplus(x W_a + dt_bias)`` (log-decay, <= 0), ``A ~ U(A_init_range)``,
    ``dt_bias = softplus^-1(dt)`` with dt log-uniform in ``[dt_min, dt_max]`` floored at
    ``dt_init_floor`` (as Mamba2); output ``o_norm(o) * silu(x W_g)``; value heads ``expand_v`` (2)
    times wider than key heads.
    """

    _gated_decay = True

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        head_dim: int = 64,
        expand_v: float = 2.0,
        conv_size: int = 4,
        use_short_conv: bool = True,
        A_init_range: tuple[float, float] = (0.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 64,
        *,
        layer_idx: int | None = None,
        backend: str = "auto",
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        Mixer.__init__(self)
        lo, hi = A_init_range
        if not 0 <= lo <= hi:
            raise ValueError(f"GatedDeltaNet: A_init_range={A_init_range} must satisfy 0 <= lo <= hi")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"GatedDeltaNet: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.A_init_range = (float(lo), float(hi))
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self._build(
            d_model,
            n_heads,
            head_dim,
            expand_v,
            conv_size,
            use_short_conv,
            True,
            chunk_size,
            layer_idx,
            backend,
            norm_eps,
            device,
            dtype,
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init convs and norm, then A_log = log U(A_init_range) and dt_bias = softplus^-1(dt) (as Mamba2)."""
        super().reset_parameters()
        dev = self.A_log.device
        lo, hi = self.A_init_range
        A = torch.empty(self.n_heads, device=dev, dtype=torch.float32).uniform_(lo, hi)
        # U(0, hi) can draw exactly 0: clamp so that A_log stays finite.
        self.A_log.copy_(A.clamp_min(torch.finfo(torch.float32).tiny).log())
        dt = sample_dt(self.n_heads, self.dt_min, self.dt_max, self.dt_init_floor, dev, torch.float32)
        self.dt_bias.copy_(inverse_softplus(dt))

    def _decay(self, x: torch.Tensor) -> torch.Tensor:
        """Log-decay ``g [B, T, H]`` (<= 0), in float32 (float64 for a float64 layer)."""
        a = _acc(self.a_proj(x)) + _acc(self.dt_bias)
        return -_acc(self.A_log).exp() * F.softplus(a)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, A_init_range={self.A_init_range}, dt=[{self.dt_min}, {self.dt_max}]"


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype for gates: float32, or float64 for float64 tensors."""
    return t if t.dtype == torch.float64 else t.float()


__all__ = ["DeltaNet", "DeltaNetCache", "GatedDeltaNet", "ShortConvolution", "delta_rule_steps", "l2_normalize"]
