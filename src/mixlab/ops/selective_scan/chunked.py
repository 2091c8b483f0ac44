"""Mamba's selective scan, chunkwise in plain PyTorch: no Python loop over every time step.

The recurrence ``h_t = a_t * h_{t-1} + x_t`` (``a_t = exp(delta_t A)``, ``x_t = delta_t u_t B_t``,
per batch, channel and state) is a linear scan. It runs in time blocks of ``Tb = Q * nq`` steps,
one block after another with the state carried between them; inside a block:

1. every sub-chunk of ``Q`` steps runs a local scan from a zero state, all ``nq`` sub-chunks at
   once (``Q`` vectorised steps instead of ``Tb``);
2. the sub-chunks' end states are chained (``nq`` steps): ``H_j = decay_j * H_{j-1} + local_end_j``;
3. every position adds the carried state times its cumulative decay since the sub-chunk start,
   ``exp(A * (cumsum(delta)_t - cumsum(delta)_start))`` — the exponent is never positive for
   ``delta >= 0``, ``A <= 0``, so nothing overflows.

A block costs ``Q + nq ~ 2 sqrt(Tb)`` Python steps instead of ``Tb``. The backward is the same
machinery run in reverse (the gradient of a linear scan is a linear scan with the decays shifted
by one step), block by block, recomputing each block's states from the state saved at its entry:
memory stays at the inputs plus one block of states, and every intermediate is a block-sized
buffer reused in place (large fresh allocations cost more than the arithmetic on CPU).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .reference import _acc_dtype

#: Elements (batch x channels x states x steps) of one time block: a few MB, cache-friendly.
BLOCK_ELEMENTS = 1 << 19
MAX_BLOCK_STEPS = 1024
LOG2_E = 1.0 / math.log(2.0)


class _Plan:
    """Block geometry for ``L`` steps of ``per_step`` state elements: blocks of ``Tb = nq * Q`` steps."""

    def __init__(self, L: int, per_step: int) -> None:
        tb = max(1, min(MAX_BLOCK_STEPS, BLOCK_ELEMENTS // max(per_step, 1), L))
        self.Q = math.isqrt(tb - 1) + 1 if tb > 1 else 1  # ceil(sqrt(tb)): steps per sub-chunk
        self.nq = -(-tb // self.Q)  # sub-chunks per block
        self.Tb = self.Q * self.nq
        self.nblocks = max(1, -(-L // self.Tb))
        self.Lp = self.nblocks * self.Tb


def _time_major(t: torch.Tensor, plan: _Plan, G: int) -> torch.Tensor:
    """``[B, D, L]`` -> ``[Lp, B, G, 1, D/G]``, zero-padded in time (a cheap copy when ``t`` is a
    transposed ``[B, L, D]`` tensor, as the Mamba layer passes it)."""
    b, d, L = t.shape
    out = t.new_empty(plan.Lp, b, d)
    out[:L].copy_(t.permute(2, 0, 1))
    out[L:].zero_()
    return out.view(plan.Lp, b, G, 1, d // G)


def _time_major_bc(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``[B, G, N, L]`` -> ``[Lp, B, G, N]``, zero-padded in time."""
    b, g, n, L = t.shape
    out = t.new_empty(plan.Lp, b, g, n)
    out[:L].copy_(t.permute(3, 0, 1, 2))
    out[L:].zero_()
    return out


class _Workspace:
    """Block-sized buffers ``[nq, Q, B, G, N, R]`` reused by every block, allocated once per call, with
    their per-position views made once (``a_k[k]``: position k of every sub-chunk, ``[nq, B, G, N, R]``).

    Channels are the innermost dim so that every elementwise op runs over long contiguous rows
    (broadcasting over a short innermost dim of 16 states is several times slower)."""

    def __init__(self, plan: _Plan, b: int, G: int, N: int, R: int, like: torch.Tensor, backward: bool) -> None:
        self.key: tuple = ()
        shape = (plan.nq, plan.Q, b, G, N, R)
        self.a, self.cum, self.h = (like.new_empty(shape) for _ in range(3))
        self.a_k, self.cum_k, self.h_k = self.a.unbind(1), self.cum.unbind(1), self.h.unbind(1)
        self.a_first, self.cum_first = self.a_k[0].unbind(0), self.cum_k[0].unbind(0)
        self.h_last, self.cum_last = self.h_k[-1].unbind(0), self.cum_k[-1].unbind(0)
        self.carry = like.new_empty(plan.nq + 1, b, G, N, R)
        self.carry_j = self.carry.unbind(0)
        if backward:
            self.lam = like.new_empty(shape)
            self.lam_k = self.lam.unbind(1)
            self.lam_first = self.lam_k[0].unbind(0)


_CACHE = threading.local()


def _workspace(plan: _Plan, b: int, G: int, N: int, R: int, like: torch.Tensor, backward: bool) -> _Workspace:
    """A workspace for this call. On the CPU the last one of each kind is kept per thread and reused:
    fresh multi-MB buffers cost page faults on every call, a measurable share of the scan's time.
    A workspace only lives inside one forward or one backward, which never nest."""
    if like.device.type != "cpu":
        return _Workspace(plan, b, G, N, R, like, backward)
    key = (plan.nq, plan.Q, b, G, N, R, like.dtype, backward)
    cached = getattr(_CACHE, "fwd_bwd", {})
    ws = cached.get(backward)
    if ws is None or ws.key != key:
        ws = _Workspace(plan, b, G, N, R, like, backward)
        ws.key = key
        cached[backward] = ws
        _CACHE.fwd_bwd = cached
    return ws


def _block_states(ws: _Workspace, d: torch.Tensor, du: torch.Tensor, A2: torch.Tensor, Bb: torch.Tensor) -> None:
    """States of one block into ``ws.h``, decays ``exp(delta_t A)`` into ``ws.a``, the state after the
    block into ``ws.carry_j[-1]``; the state entering the block must be in ``ws.carry_j[0]``.

    d, du: ``[nq, Q, B, G, 1, R]`` (delta and delta*u); A2: ``[G, N, R]`` = A * log2(e);
    Bb: ``[nq, Q, B, G, N, 1]``.
    """
    a_k, cum_k, h_k, carry_j = ws.a_k, ws.cum_k, ws.h_k, ws.carry_j
    torch.mul(d, A2, out=ws.a)
    torch.exp2(ws.a, out=ws.a)  # exp2 of pre-scaled A: about twice as fast as exp on CPU
    torch.mul(du, Bb, out=ws.h)  # x_t
    cum_k[0].copy_(a_k[0])
    for k in range(1, len(a_k)):  # local scans of every sub-chunk at once, from a zero state
        h_k[k].addcmul_(a_k[k], h_k[k - 1])
        torch.mul(a_k[k], cum_k[k - 1], out=cum_k[k])  # decay since the sub-chunk start, inclusive
    for j, (h_end, decay) in enumerate(zip(ws.h_last, ws.cum_last)):  # chain the sub-chunks
        torch.addcmul(h_end, decay, carry_j[j], out=carry_j[j + 1])
    ws.h.addcmul_(ws.cum, ws.carry[:-1, None])  # add each sub-chunk's entering state, decayed


class _ChunkedScan(torch.autograd.Function):
    """The whole op ``(u, delta, A, B, C, h0, D, z, delta_bias) -> (y, h_last)``; tensors already in the
    compute dtype, D / z / delta_bias may be None.

    u, delta, z: ``[B, D, L]``; A: ``[D, N]``; B, C: ``[B, G, N, L]``; h0: ``[B, D, N]``. Internally
    time-major ``[Lp, B, G, ., R]`` (R = D/G channels innermost), where the elementwise work around
    the scan (bias, softplus, the D skip, the z gate) runs on contiguous rows too; y comes back as a
    ``[B, D, L]`` view of that layout.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, D_skip, z, delta_bias, softplus):  # type: ignore[override]
        b, D, L = delta.shape
        G, N = B.shape[1], B.shape[2]
        R = D // G
        plan = _Plan(L, b * D * N)
        blk = (plan.nq, plan.Q)
        rows = plan.Tb * b * G  # rows of a block in the batched product C_t^T h_t
        dT, uT = _time_major(delta, plan, G), _time_major(u, plan, G)
        if delta_bias is not None:
            dT += delta_bias.view(G, 1, R)
        if softplus:
            dT = F.softplus(dT)
        if delta_bias is not None or softplus:
            dT[L:] = 0.0  # padding steps must not decay the state
        duT = dT * uT
        BT, CT = _time_major_bc(B, plan), _time_major_bc(C, plan)
        C_rows = CT.view(-1, 1, N)
        A2 = A.reshape(G, R, N).transpose(1, 2) * LOG2_E
        ws = _workspace(plan, b, G, N, R, dT, backward=False)
        yT = dT.new_empty(plan.Lp * b * G, 1, R)
        entry = dT.new_empty(plan.nblocks, b, G, N, R)  # the state entering every block, for the backward
        ws.carry_j[-1].copy_(h0.reshape(b, G, R, N).transpose(-1, -2))
        for i in range(plan.nblocks):
            ws.carry_j[0].copy_(ws.carry_j[-1])
            entry[i] = ws.carry_j[0]
            s = slice(i * plan.Tb, (i + 1) * plan.Tb)
            B_b = BT[s].view(*blk, b, G, N, 1)
            _block_states(ws, dT[s].view(*blk, b, G, 1, R), duT[s].view(*blk, b, G, 1, R), A2, B_b)
            r = slice(i * rows, (i + 1) * rows)
            yT[r] = torch.bmm(C_rows[r], ws.h.view(rows, N, R))  # y_t = C_t^T h_t
        yT = yT.view(plan.Lp, b, G, 1, R)
        if D_skip is not None:
            yT.addcmul_(uT, D_skip.view(G, 1, R))
        zT = None
        if z is not None:
            zT = _time_major(z, plan, G)
            ctx.y_pre = yT.clone()  # before the gate, for the gate's gradient
            yT.mul_(F.silu(zT))
        ctx.save_for_backward(dT, uT, duT, A, BT, CT, entry, D_skip, zT)
        ctx.plan, ctx.softplus, ctx.has_bias = plan, softplus, delta_bias is not None
        y = yT.view(plan.Lp, b, D)[:L].permute(1, 2, 0)  # a view: [B, D, L] with D innermost in memory
        return y, ws.carry_j[-1].transpose(-1, -2).reshape(b, D, N).clone()

    @staticmethod
    def backward(ctx, gy, gH):  # type: ignore[override]
        dT, uT, duT, A, BT, CT, entry, D_skip, zT = ctx.saved_tensors
        plan: _Plan = ctx.plan
        Lp, b, G, _, R = dT.shape
        N = BT.shape[-1]
        D, L = G * R, gy.shape[-1]
        Q, nq, Tb = plan.Q, plan.nq, plan.Tb
        blk = (nq, Q)
        rows = Tb * b * G
        B_rows = BT.view(-1, 1, N)
        gyT = _time_major(gy, plan, G)  # d loss / d y, then d loss / d (C.h + D u) below
        grad_z = None
        if zT is not None:
            sig = torch.sigmoid(zT)
            silu = zT * sig
            gate_grad = gyT * ctx.y_pre * sig * (1 + zT * (1 - sig))  # d silu(z)/dz = sig (1 + z (1 - sig))
            grad_z = gate_grad
            gyT.mul_(silu)
        grad_D = None
        if D_skip is not None:
            grad_D = (gyT * uT).sum((0, 1)).view(D)
        A3 = A.reshape(G, R, N).transpose(1, 2).contiguous()
        A2 = A3 * LOG2_E
        ws = _workspace(plan, b, G, N, R, dT, backward=True)
        a, cum, h, lam, carry_j = ws.a, ws.cum, ws.h, ws.lam, ws.carry_j
        a_k, cum_k, lam_k = ws.a_k, ws.cum_k, ws.lam_k
        a_t, h_t, w_t = a.view(Tb, b, G, N, R), h.view(Tb, b, G, N, R), cum.view(Tb, b, G, N, R)
        # gradient w.r.t. the state leaving the current block (entering the next one)
        grad_carry = dT.new_empty(b, G, N, R)  # a fresh tensor: it is updated in place below
        grad_carry.copy_(gH.reshape(b, G, R, N).transpose(-1, -2))
        g_delta = dT.new_empty(Lp, b, G, 1, R)
        g_du = dT.new_empty(Lp, b, G, 1, R)  # through x_t = du_t B_t
        g_B = dT.new_empty(Lp, b, G, N)
        g_C = dT.new_empty(Lp, b, G, N)
        g_A = torch.zeros_like(A3)
        for i in reversed(range(plan.nblocks)):
            s = slice(i * Tb, (i + 1) * Tb)
            d_b = dT[s].view(*blk, b, G, 1, R)
            du_b = duT[s].view(*blk, b, G, 1, R)
            gy_b = gyT[s].view(*blk, b, G, 1, R)
            carry_j[0].copy_(entry[i])
            _block_states(ws, d_b, du_b, A2, BT[s].view(*blk, b, G, N, 1))
            # lam_t = dL/dh_t = C_t gy_t + a_{t+1} lam_{t+1}: the same scan run backwards with the decays
            # shifted by one step. cum_k[k] becomes the decay from k+1 to the sub-chunk end (1 at the end).
            torch.mul(CT[s].view(*blk, b, G, N, 1), gy_b, out=lam)
            cum_k[Q - 1].fill_(1.0)
            for k in range(Q - 2, -1, -1):
                lam_k[k].addcmul_(a_k[k + 1], lam_k[k + 1])
                torch.mul(a_k[k + 1], cum_k[k + 1], out=cum_k[k])
            carry_j[nq].copy_(grad_carry)
            for j in range(nq - 1, -1, -1):  # carry_j[j + 1]: gradient entering sub-chunk j from its right
                lam0 = torch.addcmul(ws.lam_first[j], ws.cum_first[j], carry_j[j + 1])
                torch.mul(ws.a_first[j], lam0, out=carry_j[j])
            lam.addcmul_(cum, ws.carry[1:, None])
            grad_carry.copy_(carry_j[0])
            # every gradient, from h, lam and w_t = lam_t * a_t * h_{t-1} = d loss / d log(a_t)
            torch.mul(h, gy_b, out=cum)
            torch.sum(cum, -1, out=g_C[s].view(*blk, b, G, N))  # over the group's channels
            torch.mul(a_t[1:], h_t[:-1], out=w_t[1:])
            torch.mul(a_t[0], entry[i], out=w_t[0])
            cum.mul_(lam)
            torch.mul(lam, du_b, out=h)
            torch.sum(h, -1, out=g_B[s].view(*blk, b, G, N))
            r = slice(i * rows, (i + 1) * rows)
            g_du.view(-1, 1, R)[r] = torch.bmm(B_rows[r], lam.view(rows, N, R))
            torch.mul(cum, A3, out=h)
            torch.sum(h, -2, keepdim=True, out=g_delta[s].view(*blk, b, G, 1, R))
            torch.mul(cum, d_b, out=h)
            g_A += h.sum((0, 1, 2))

        def back(t: torch.Tensor) -> torch.Tensor:  # [Lp, ...] -> a [B, ..., L] view
            return t.view(Lp, b, -1)[:L].permute(1, 2, 0)

        grad_u = g_du * dT  # x_t = delta_t u_t B_t
        if D_skip is not None:
            grad_u.addcmul_(gyT, D_skip.view(G, 1, R))
        g_delta.addcmul_(g_du, uT)
        if ctx.softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
            g_delta.mul_(torch.expm1(-dT).neg_())
        grad_bias = g_delta[:L].sum((0, 1)).view(D) if ctx.has_bias else None
        return (
            back(grad_u),
            back(g_delta),
            g_A.transpose(1, 2).reshape(D, N),
            back(g_B).view(b, G, N, L),
            back(g_C).view(b, G, N, L),
            grad_carry.transpose(-1, -2).reshape(b, D, N),
            grad_D,
            None if grad_z is None else back(grad_z),
            grad_bias,
            None,
        )


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan, chunkwise. Same arguments and results as
    :func:`mixlab.ops.selective_scan.reference.selective_scan_reference`; differentiable in every
    tensor argument (the gradient of the returned last state included)."""
    acc = _acc_dtype(u)
    b, d, _ = u.shape
    n = A.shape[1]
    Bg = (B.unsqueeze(1) if B.dim() == 3 else B).to(acc)
    Cg = (C.unsqueeze(1) if C.dim() == 3 else C).to(acc)
    if Bg.shape[1] != Cg.shape[1]:  # different groupings: give both one group per channel
        Bg = Bg.repeat_interleave(d // Bg.shape[1], dim=1)
        Cg = Cg.repeat_interleave(d // Cg.shape[1], dim=1)
    h0 = initial_state.to(acc) if initial_state is not None else u.new_zeros(b, d, n, dtype=acc)

    def opt(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(acc)

    y, last = _ChunkedScan.apply(
        u.to(acc), delta.to(acc), A.to(acc), Bg, Cg, h0, opt(D), opt(z), opt(delta_bias), delta_softplus
    )
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


__all__ = ["selective_scan_chunked"]
