"""Triton backend of the (gated) delta rule: chunkwise kernels for training and prefill, and a fused
recurrent kernel for decoding (one token or a few per call).

``delta_rule_triton`` runs the chunk kernels (forward and backward) through the ``torch.library``
custom op ``mixlab::chunk_gated_delta_fwd``; ``delta_rule_recurrent_triton`` is forward-only.
"""

from __future__ import annotations

import torch

from ..._triton.ops import chunk_gated_delta_fwd
from ..._triton.recurrent import recurrent_gated_delta

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _prepare(q, k, v, beta, g, initial_state):
    if q.dtype not in _DTYPES:
        raise ValueError(
            f"delta_rule(backend='triton') takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
            "use backend='chunked' or 'reference' for float64"
        )
    dt = q.dtype
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    beta = beta.contiguous()
    g = g.contiguous() if g is not None else None
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return q, k, v, beta, g, initial_state


def delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise (gated) delta rule on Triton kernels, differentiable in every input.

    Shapes and semantics as :func:`mixlab.ops.delta_rule.delta_rule`: q, k ``[B, T, H, K]``,
    v ``[B, T, H, V]``, beta/g ``[B, T, H]``, states ``[N, H, K, V]`` float32.
    Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, beta, g, initial_state = _prepare(q, k, v, beta, g, initial_state)
    o, ht, *_ = chunk_gated_delta_fwd(
        q, k, v, beta, g, float(scale), initial_state, output_final_state, cu_seqlens, True
    )
    return o, (ht if output_final_state else None)


def delta_rule_recurrent_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token (gated) delta rule in one fused kernel: the decode path (forward only, no autograd).

    Same arguments and results as :func:`delta_rule_triton`; cheapest for T of 1 to a few dozen tokens.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, beta, g, initial_state = _prepare(q, k, v, beta, g, initial_state)
    return recurrent_gated_delta(
        q, k, v, beta, g, float(scale), initial_state, output_final_state, cu_seqlens, use_delta=True
    )


__all__ = ["delta_rule_recurrent_triton", "delta_rule_triton"]
