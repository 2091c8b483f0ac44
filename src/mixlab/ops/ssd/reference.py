"""Mamba2's SSD as a step-by-step recurrence: the definition the other backends are tested against.

Semantics of mamba_ssm's ``mamba_chunk_scan_combined`` (and of the paper's ``ssd_minimal_discrete``
with ``X = x * dt``, ``A = A * dt``). Per batch, head h (group ``g = h // (H/G)``, so each group
serves H/G contiguous heads) and step t, with the state ``S`` ``[P, N]``:

    dt_t = softplus(dt_t + dt_bias)             # both optional
    S    = exp(dt_t * A[h]) * S + dt_t * x_t B_t^T
    y_t  = S C_t + D[h] * x_t
    y_t  = y_t * silu(z_t)                       # the gate comes after the D skip, as in mamba_ssm

With ``cu_seqlens`` the batch is one packed row of sequences; each starts from its own initial
state and yields its own final state. Slow (a Python loop over time) but obviously right,
differentiable by autograd, float64-friendly.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (states are always at least float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    """Compute dtype, ``dt`` after bias/softplus ``[B, T, H]`` and ``A`` in that dtype."""
    acc = _acc_dtype(x)
    dtf = dt.to(acc)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(acc)
    if dt_softplus:
        dtf = F.softplus(dtf)
    return acc, dtf, A.to(acc)


def _finish(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, acc: torch.dtype
) -> torch.Tensor:
    """``(y + D x) * silu(z)`` cast to x's dtype. y, x, z ``[B, T, H, P]``; D ``[H]`` or ``[H, P]``."""
    if D is not None:
        Df = D.to(acc)
        y = y + x.to(acc) * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)


def _split_sequences(T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """``(start, end)`` of every packed sequence, or None without ``cu_seqlens``."""
    if cu_seqlens is None:
        return None
    offs = [int(o) for o in cu_seqlens.tolist()]
    if offs[0] != 0 or offs[-1] != T or any(b < a for a, b in itertools.pairwise(offs)):
        raise ValueError(
            f"ssd: cu_seqlens must rise from 0 to the packed length T={T}, got {offs}; "
            "pass the offsets of the packed sequences, e.g. [0, len_0, len_0 + len_1, ...]"
        )
    return list(itertools.pairwise(offs))


def _recurrence(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``, B/C ``[B, T, H, N]`` (per head), state ``[B, H, P, N]``;
    all in the compute dtype. Returns ``(y [B, T, H, P] without D/z, final state)``."""
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t * A)[..., None, None]  # [B, H, 1, 1]
        state = decay * state + (dt_t[..., None] * x_t)[..., :, None] * B_t[..., None, :]
        ys.append((state * C_t[..., None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y, state


def ssd_reference(
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
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step SSD. Shapes as :func:`mixlab.ops.ssd.ssd`.

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]`` with ``H % G == 0``.
        D: ``[H]`` or ``[H, P]``; z: ``[B, T, H, P]``; dt_bias: ``[H]``.
        initial_state: ``[N_seq, H, P, N]`` (N_seq = B, or the number of packed sequences).
        output_final_state: also return the final state ``[N_seq, H, P, N]``.
        cu_seqlens: ``[N_seq + 1]`` offsets of packed sequences in a ``B == 1`` batch.

    Returns:
        ``(y [B, T, H, P] in x's dtype, final state in float32 (float64 for float64 inputs) or None)``.
    """
    acc, dtf, Af = _prepare(x, dt, A, dt_bias, dt_softplus)
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    xf = x.to(acc)
    Bh = B.to(acc).repeat_interleave(H // G, dim=2)  # [B, T, H, N]: head h reads group h // (H/G)
    Ch = C.to(acc).repeat_interleave(H // G, dim=2)
    seqs = _split_sequences(T, cu_seqlens)
    if seqs is None:
        h0 = initial_state.to(acc) if initial_state is not None else xf.new_zeros(b, H, P, N)
        y, final = _recurrence(xf, dtf, Af, Bh, Ch, h0)
    else:
        ys, finals = [], []
        for i, (s, e) in enumerate(seqs):
            h0 = initial_state[i : i + 1].to(acc) if initial_state is not None else xf.new_zeros(1, H, P, N)
            y_i, f_i = _recurrence(xf[:, s:e], dtf[:, s:e], Af, Bh[:, s:e], Ch[:, s:e], h0)
            ys.append(y_i)
            finals.append(f_i)
        y = torch.cat(ys, dim=1) if ys else xf.new_zeros(xf.shape)
        final = torch.cat(finals, dim=0) if finals else xf.new_zeros(0, H, P, N)
    return _finish(y, x, D, z, acc), (final if output_final_state else None)


__all__ = ["ssd_reference"]
