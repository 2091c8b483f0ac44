"""Mamba2's SSD, chunkwise-parallel in plain PyTorch (the state-space duality), differentiable by autograd.

Per chunk of Q steps, per head, with ``a_t = dt_t A`` the log-decay and ``cs`` its inclusive cumsum
inside the chunk (the algorithm of mamba_ssm's ``ssd_minimal_discrete``):

1. intra-chunk (quadratic, attention-like): ``y_i += sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j``;
2. chunk states from a zero state: ``S_c = sum_j exp(cs_last - cs_j) dt_j x_j B_j^T``;
3. inter-chunk recurrence over chunks (a short Python loop): ``H_c = exp(cs_last) H_{c-1} + S_c``;
4. the state entering each chunk read out: ``y_i += exp(cs_i) H_{c-1} C_i``.

Every exponent is a difference ``cs_i - cs_j`` with ``i >= j`` (or a cumsum itself), never positive
for ``dt >= 0``, ``A <= 0``; the upper triangle is masked to ``-inf`` before the exp. Any T: the
tail is padded with ``dt = 0`` steps (decay 1, no input), which leave the state unchanged; an input
shorter than a chunk is one chunk of its own length (a decode step costs O(1), not O(chunk_size^2)).
Packed sequences (``cu_seqlens``) run as a zero-padded batch of their own.

Chunks are at most ``MAX_CHUNK`` = 64 steps whatever ``chunk_size`` asks (the result does not depend
on the chunk; the Triton kernels always use 64 too): the ``[Q, Q]`` decay matrices cost O(T Q) memory
and elementwise passes, and on the CPU forward + backward at T = 256 (Mamba2-tiny: 8 heads of 64,
N = 128) take 94 ms with Q = 64 against 139 ms with mamba_ssm's default of 256 (and 111 ms with 32).
Everything is laid out head-major, ``[b, chunks, G, H/G, Q, .]``, so that every product is a
batched matmul over contiguous operands and the large ``[Q, Q]`` tensors are never permuted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _finish, _prepare, _split_sequences

#: Largest chunk the chunked backend uses (see the module docstring).
MAX_CHUNK = 64


def _pad_time(t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` (a time axis) up to ``length``."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return F.pad(t, pad)


def _chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor,
    Q: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[b, T, H, P]``, dt ``[b, T, H]`` (after bias/softplus), A ``[H]``, B/C ``[b, T, G, N]``,
    h0 ``[b, H, P, N]``; all in the compute dtype. Returns ``(y [b, T, H, P] without D/z, final state)``."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group, contiguous
    if T == 0:
        return x.new_zeros(x.shape), h0
    Q = min(Q, MAX_CHUNK, T)  # a short input is one chunk of its own length, never padded up to a chunk
    nc = -(-T // Q)
    Tp = nc * Q
    # head-major [b, nc, G, R, Q, .] (B and C [b, nc, G, Q, N]): the products below are batched matmuls
    xc = _pad_time(x, Tp).view(b, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)
    dtc = _pad_time(dt, Tp).view(b, nc, Q, G, R).permute(0, 1, 3, 4, 2)
    Bc = _pad_time(B, Tp).view(b, nc, Q, G, N).transpose(2, 3)
    Cc = _pad_time(C, Tp).view(b, nc, Q, G, N).transpose(2, 3)
    cs = torch.cumsum(dtc * A.view(G, R, 1), dim=-1)  # [b, nc, G, R, Q]
    xdt = xc * dtc[..., None]  # dt_j x_j  [b, nc, G, R, Q, P]

    # 1. intra-chunk: decay matrix exp(cs_i - cs_j) on the causal triangle, 0 above it (in place: the
    # subtraction's and the mask's gradients need none of the values they overwrite)
    upper = torch.ones(Q, Q, dtype=torch.bool, device=x.device).triu(1)
    decay = (cs[..., :, None] - cs[..., None, :]).masked_fill_(upper, float("-inf")).exp_()  # [.., Q_i, Q_j]
    CB = Cc @ Bc.transpose(-1, -2)  # C_i . B_j  [b, nc, G, Q, Q]
    y = (decay * CB[:, :, :, None]) @ xdt  # [b, nc, G, R, Q, P]

    # 2. every chunk's own contribution to the state at its end, [b, nc, G, R*P, N]
    to_end = torch.exp(cs[..., -1:] - cs)  # [b, nc, G, R, Q]
    S = (xdt * to_end[..., None]).transpose(-1, -2).reshape(b, nc, G, R * P, Q) @ Bc

    # 3. the state entering every chunk (unbind, not indexing, keeps the backward linear in nc)
    chunk_decay = torch.exp(cs[..., -1])[..., None, None]  # [b, nc, G, R, 1, 1]
    h = h0.reshape(b, G, R, P, N)
    entering = []
    for dec_c, S_c in zip(chunk_decay.unbind(1), S.view(b, nc, G, R, P, N).unbind(1)):
        entering.append(h)
        h = dec_c * h + S_c
    H_in = torch.stack(entering, dim=1)  # [b, nc, G, R, P, N]

    # 4. read the entering state out at every position: C_i H^T, [b, nc, G, Q, R*P] -> [b, nc, G, R, Q, P]
    y_in = (Cc @ H_in.view(b, nc, G, R * P, N).transpose(-1, -2)).view(b, nc, G, Q, R, P).transpose(3, 4)
    y = y + y_in * torch.exp(cs)[..., None]
    return y.permute(0, 1, 4, 2, 3, 5).reshape(b, Tp, H, P)[:, :T], h.reshape(b, H, P, N)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise SSD. Same arguments and results as :func:`mixlab.ops.ssd.reference.ssd_reference`,
    plus ``chunk_size`` (any positive value, capped at ``MAX_CHUNK``; the result does not depend on it)."""
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive number of steps, got {chunk_size}")
    acc, dtf, Af = _prepare(x, dt, A, dt_bias, dt_softplus)
    b, T, H, P = x.shape
    N = B.shape[3]
    xf, Bf, Cf = x.to(acc), B.to(acc), C.to(acc)
    seqs = _split_sequences(T, cu_seqlens)
    if seqs is None:
        h0 = initial_state.to(acc) if initial_state is not None else xf.new_zeros(b, H, P, N)
        y, final = _chunk_scan(xf, dtf, Af, Bf, Cf, h0, chunk_size)
    elif not seqs:
        y, final = xf.new_zeros(xf.shape), xf.new_zeros(0, H, P, N)
    else:
        # one row per sequence, zero-padded at the end (dt = 0 there, so the final states are exact)
        t_max = max(e - s for s, e in seqs)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return torch.stack([_pad_time(t[0, s:e], t_max, dim=0) for s, e in seqs])

        n_seq = len(seqs)
        h0 = initial_state.to(acc) if initial_state is not None else xf.new_zeros(n_seq, H, P, N)
        y_rows, final = _chunk_scan(rows(xf), rows(dtf), Af, rows(Bf), rows(Cf), h0, chunk_size)
        y = torch.cat([y_rows[i, : e - s] for i, (s, e) in enumerate(seqs)], dim=0)[None]
    return _finish(y, x, D, z, acc), (final if output_final_state else None)


__all__ = ["MAX_CHUNK", "ssd_chunked"]
