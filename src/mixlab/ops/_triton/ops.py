"""``torch.library`` custom ops around the chunk kernels, so ``torch.compile`` traces around them.

``mixlab::chunk_gated_delta_fwd`` / ``_bwd`` serve both the delta rule (``use_delta=True``) and gated
linear attention (``use_delta=False``, SSD). Optional outputs come back as empty tensors. With
``chunk.CONFIG["bwd_h"]["save"]`` the delta rule's forward also returns its chunk states and V_new, which
autograd keeps for the backward instead of recomputing them. Otherwise, for few long sequences, it returns the
float32 states entering the backward recompute's segments (``hs``, see ``chunk.recompute_segment_chunks``), so
the recompute runs the segments in parallel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk import BT, CONFIG, chunk_bwd, chunk_fwd, save_states, segment_states_shape, states_shape


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


@torch.library.custom_op("mixlab::chunk_gated_delta_fwd", mutates_args=())
def chunk_gated_delta_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    use_delta: bool,
    keep_states: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(o, final_state | empty, Tm | empty, w | empty, u | empty, h | empty, vn | empty, hs | empty)``;
    see ``chunk.chunk_fwd`` (h and vn only with the delta rule and :func:`_keeps`, hs only for a segmented
    recompute). ``keep_states``: whether the forward keeps h and vn for the backward (None: ``save_states()``);
    a caller that decides per call passes it, so that a compiled graph carries the decision (and its shapes)."""
    keep = _keeps(use_delta, keep_states)
    o, ht, Tm, w, u, h, vn, hs = chunk_fwd(
        q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, use_delta, keep_states=keep
    )
    B, T, H, K = *v.shape[:3], q.shape[-1]
    if use_delta and Tm is None:  # no tokens
        Tm = q.new_empty(B, T, H, BT, dtype=torch.float32)
        w, u = q.new_empty(B, T, H, K), torch.empty_like(v)
    if keep and h is None:
        h, vn = q.new_empty(_states_shape(q, v, cu_seqlens)), torch.empty_like(v)
    return (
        o,
        ht if ht is not None else _empty(v).float(),
        Tm if Tm is not None else _empty(v).float(),
        w if w is not None else _empty(v),
        u if u is not None else _empty(v),
        h if h is not None else _empty(v),
        vn if vn is not None else _empty(v),
        hs if hs is not None else _empty(v).float(),
    )


def _keeps(use_delta: bool, keep_states: bool | None) -> bool:
    """Whether a delta-rule forward keeps its chunk states: ``keep_states``, or ``save_states()`` when None."""
    return use_delta and (save_states() if keep_states is None else keep_states)


def _states_shape(q: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> tuple[int, int, int, int]:
    B, T, H, V = v.shape
    return states_shape(B, T, H, q.shape[-1], V, cu_seqlens.shape[0] - 1 if cu_seqlens is not None else None)


@chunk_gated_delta_fwd.register_fake
def _(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, use_delta, keep_states=None):
    keep = _keeps(use_delta, keep_states)
    B, T, H, V = v.shape
    K = q.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    ht = v.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else v.new_empty(0, dtype=torch.float32)
    if use_delta:
        Tm, w, u = v.new_empty(B, T, H, BT, dtype=torch.float32), v.new_empty(B, T, H, K), torch.empty_like(v)
    else:
        Tm, w, u = v.new_empty(0, dtype=torch.float32), v.new_empty(0), v.new_empty(0)
    if keep:
        h, vn = v.new_empty(_states_shape(q, v, cu_seqlens)), torch.empty_like(v)
    else:
        h, vn = v.new_empty(0), v.new_empty(0)
    hs_shape = segment_states_shape(B, T, H, K, V, cu_seqlens is not None, keep)
    hs = v.new_empty(hs_shape, dtype=torch.float32)
    return torch.empty_like(v), ht, Tm, w, u, h, vn, hs


@torch.library.custom_op("mixlab::chunk_gated_delta_bwd", mutates_args=())
def chunk_gated_delta_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    Tm: Tensor,
    w: Tensor,
    u: Tensor,
    do: Tensor,
    dht: Tensor | None,
    use_delta: bool,
    h: Tensor | None = None,
    vn: Tensor | None = None,
    hs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv, dbeta | empty, dg | empty, dh0 | empty)`` in the inputs' dtypes; ``h``, ``vn``:
    the forward's kept states (recomputed when None); ``hs``: the forward's segment states (or None / empty)."""
    dq, dk, dv, dbeta, dg, dh0 = chunk_bwd(
        q, k, v, beta, g, scale, initial_state, cu_seqlens,
        Tm if use_delta else None, w if use_delta else None, u if use_delta else None, do, dht, use_delta,
        h if use_delta else None, vn if use_delta else None, hs=hs,
    )  # fmt: skip
    return (
        dq,
        dk,
        dv,
        dbeta.to(beta.dtype) if dbeta is not None else _empty(v),
        dg.to(g.dtype) if dg is not None else _empty(v),
        dh0.to(initial_state.dtype) if dh0 is not None else _empty(v),
    )


@chunk_gated_delta_bwd.register_fake
def _(q, k, v, beta, g, scale, initial_state, cu_seqlens, Tm, w, u, do, dht, use_delta, h=None, vn=None, hs=None):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(beta) if use_delta else v.new_empty(0),
        torch.empty_like(g) if g is not None else v.new_empty(0),
        torch.empty_like(initial_state) if initial_state is not None else v.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, use_delta, *_ = inputs
    _, _, Tm, w, u, h, vn, hs = output
    ctx.keep_states = h.numel() > 0
    # Autograd would otherwise fill zero gradients for the unused outputs (Tm, w, u, ...): three ~0.1 ms
    # memsets of [B, T, H, 64|K|V] per backward on the H100 (CONFIG["autograd"]["materialize"] 1 restores them).
    ctx.set_materialize_grads(bool(CONFIG["autograd"]["materialize"]))
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens, Tm, w, u, h, vn, hs)
    ctx.scale, ctx.output_final_state, ctx.use_delta = scale, output_final_state, use_delta


def _backward(ctx, do, dht, dTm, dw, du, dh, dvn, dhs):
    q, k, v, beta, g, initial_state, cu_seqlens, Tm, w, u, h, vn, hs = ctx.saved_tensors
    if not ctx.keep_states:
        h = vn = None
    if do is None:  # the output itself was not used
        do = torch.zeros_like(v)
    if not ctx.output_final_state or dht is None or dht.numel() == 0:
        dht = None
    else:  # e.g. SSD hands back the gradient of a transposed view
        dht = dht.contiguous()
    dq, dk, dv, dbeta, dg, dh0 = chunk_gated_delta_bwd(
        q,
        k,
        v,
        beta,
        g,
        ctx.scale,
        initial_state,
        cu_seqlens,
        Tm,
        w,
        u,
        do.contiguous(),
        dht,
        ctx.use_delta,
        h,
        vn,
        hs if hs.numel() else None,
    )
    return (
        dq,
        dk,
        dv,
        dbeta if beta is not None else None,
        dg if g is not None else None,
        None,
        dh0 if initial_state is not None else None,
        None,
        None,
        None,
        None,
    )


chunk_gated_delta_fwd.register_autograd(_backward, setup_context=_setup_context)
