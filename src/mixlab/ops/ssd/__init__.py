"""Mamba2's state-space duality (SSD), with mamba_ssm's ``mamba_chunk_scan_combined`` semantics.

x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]`` (negative), B/C ``[B, T, G, N]`` shared by H/G heads.
Per head (state h ``[P, N]``, float32): ``dt = softplus(dt + dt_bias)`` if asked;
``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``; ``y_t = h_t C_t + D x_t``; with z: ``y *= silu(z)``.
"""

from __future__ import annotations

import torch

from .._backend import plain_precision, resolve_backend


def ssd(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run SSD over a sequence.

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]`` with ``H % G == 0``.
        D: ``[H]`` or ``[H, P]`` skip; z: ``[B, T, H, P]`` gate (``y * silu(z)``); dt_bias: ``[H]``.
        initial_state / final state: ``[N_seq, H, P, N]`` float32.
        cu_seqlens: ``[N_seq + 1]`` offsets of packed sequences (batch must be 1).

    Returns:
        ``(y [B, T, H, P] in x's dtype, final_state or None)``.
    """
    _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    kwargs = dict(
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        chunk_size=chunk_size,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    impl = resolve_backend(backend, x)
    if impl == "reference":
        from .reference import ssd_reference

        kwargs.pop("chunk_size")
        with plain_precision(x):
            return ssd_reference(x, dt, A, B, C, **kwargs)
    if impl == "chunked":
        from .chunked import ssd_chunked

        with plain_precision(x):
            return ssd_chunked(x, dt, A, B, C, **kwargs)
    from .triton import ssd_recurrent_triton, ssd_triton

    if x.shape[1] <= RECURRENT_MAX_T and not _needs_grad(x, dt, A, B, C, D, z, dt_bias, initial_state):
        kwargs.pop("chunk_size")
        return ssd_recurrent_triton(x, dt, A, B, C, **kwargs)  # decode / short prefill: one kernel
    return ssd_triton(x, dt, A, B, C, **kwargs)


#: Inputs of at most this many tokens (with no gradient needed) take the fused token-by-token kernel.
RECURRENT_MAX_T = 64


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be [B, T, H, P], got {tuple(x.shape)}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"ssd: dt must be [B, T, H] = {[b, t, h]}, got {list(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd: A must be [H] = [{h}], got {list(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"ssd: B and C must be [B, T, G, N] and equal, got {tuple(B.shape)}, {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"ssd: the number of heads H={h} must be a multiple of the groups G={g}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"ssd: D must be [H] or [H, P], got {list(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"ssd: z must have x's shape {list(x.shape)}, got {list(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"ssd: dt_bias must be [H] = [{h}], got {list(dt_bias.shape)}")
    nseq = b
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"ssd: with cu_seqlens the batch must be packed into B=1, got B={b}")
        nseq = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (nseq, h, p, n):
        raise ValueError(
            f"ssd: initial_state must be [N, H, P, N_state] = {[nseq, h, p, n]}, got {list(initial_state.shape)}"
        )


__all__ = ["ssd"]
