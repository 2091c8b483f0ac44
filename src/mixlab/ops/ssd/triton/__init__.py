"""Triton backend of Mamba2's SSD: the delta-rule chunk kernels without the delta correction.

SSD per head is gated linear attention with the state transposed: with ``k = B``, ``q = C`` (shared by
the H/G heads of a group), ``v = dt·x``, ``g = dt·A`` and ``scale = 1``, the kernels' state ``S [N, P]``
is ``hᵀ`` and ``o_t = Sᵀ q_t = h_t C_t``. By default (``mixlab::ssd_fused_fwd``, see :mod:`.fused`) the
chunk kernels form ``v = dt·x`` on load and add the ``D`` skip to their output; the dt transform (bias,
softplus) and the ``silu(z)`` gate are small fused kernels, with a hand-written backward. With
``FUSED = False`` (and on the no-grad decode path) the elementwise parts are PyTorch code under
autograd around ``mixlab::chunk_gated_delta_fwd`` with ``use_delta=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._triton.ops import chunk_gated_delta_fwd
from ..._triton.recurrent import recurrent_gated_delta
from .fused import ssd_fused

#: Run the dt transform, D skip and gate as fused Triton kernels (False: the PyTorch autograd path).
FUSED = True

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtype(x):
    if x.dtype not in _DTYPES:
        raise ValueError(
            f"ssd(backend='triton') takes float16, bfloat16 or float32 inputs, got {x.dtype}; "
            "use backend='chunked' or 'reference' for float64"
        )


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_state):
    _check_dtype(x)
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    g = (dtf * A.float()).contiguous()  # [B, T, H] log-decay
    v = (x * dtf[..., None]).to(x.dtype).contiguous()  # [B, T, H, P]
    q = C.to(x.dtype).contiguous()
    k = B.to(x.dtype).contiguous()
    h0 = initial_state.transpose(-1, -2).contiguous() if initial_state is not None else None  # [N, H, N_state, P]
    return q, k, v, g, h0


def _finish(y, x, D, z):
    """``(y + D x) · silu(z)`` in float32, cast to x's dtype (as the reference rounds once)."""
    if D is None and z is None:
        return y
    y = y.float()
    if D is not None:
        y = y + x.float() * (D[:, None] if D.dim() == 1 else D).float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def ssd_triton(
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
    """SSD on Triton kernels, differentiable in every input. Shapes as :func:`mixlab.ops.ssd.ssd`:
    x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]``, B/C ``[B, T, G, N]``, states ``[N_seq, H, P, N]`` float32.

    ``chunk_size`` is accepted for API compatibility; the kernels always use 64-token chunks (the
    result is the same function; only rounding differs).
    """
    del chunk_size
    if FUSED:
        _check_dtype(x)
        return ssd_fused(
            x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )  # fmt: skip
    q, k, v, g, h0 = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_state)
    y, ht, *_ = chunk_gated_delta_fwd(q, k, v, None, g, 1.0, h0, output_final_state, cu_seqlens, False)
    final = ht.transpose(-1, -2) if output_final_state else None
    return _finish(y, x, D, z), final


def ssd_recurrent_triton(
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
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token SSD in one fused kernel: the decode path (forward only). Same arguments and
    results as :func:`ssd_triton`; cheapest for T of 1 to a few dozen tokens."""
    with torch.no_grad():
        q, k, v, g, h0 = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, initial_state)
        y, ht = recurrent_gated_delta(q, k, v, None, g, 1.0, h0, output_final_state, cu_seqlens, use_delta=False)
        return _finish(y, x, D, z), (ht.transpose(-1, -2) if ht is not None else None)


__all__ = ["ssd_recurrent_triton", "ssd_triton"]
