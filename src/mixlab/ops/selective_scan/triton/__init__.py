"""Triton backend of Mamba's selective scan: forward + backward kernels and the decode step.

Semantics are mamba_ssm's ``selective_scan_fn`` / ``selective_state_update`` (real A, variable B/C,
per-batch or grouped). The state is float32 (float64 for float64 inputs); outputs take u's dtype.
"""

from __future__ import annotations

import torch

from .op import bwd_variant, launch_config, selective_scan_fwd, selective_state_update, v3_config

__all__ = ["selective_scan_triton", "selective_state_update_triton"]


def selective_scan_triton(
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
    *,
    config: list[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan on Triton.

    u, delta, z ``[B, D, L]``; A ``[D, N]`` (real); B, C ``[B, N, L]`` or ``[B, G, N, L]`` with D % G == 0;
    D, delta_bias ``[D]``; initial_state ``[B, D, N]``. Returns ``y [B, D, L]`` or ``(y, last_state [B, D, N])``.
    ``config`` overrides the launch configuration (see :func:`launch_config`; for benchmarks and tests).
    """
    if A.is_complex():
        raise NotImplementedError("selective_scan_triton: complex A is not supported; use a real A [D, N]")
    if u.shape[-1] == 0:
        raise ValueError("selective_scan_triton: the sequence is empty (L = 0)")
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    dim, length = u.shape[1], u.shape[2]
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan_triton: B has {B.shape[1]} groups but C has {C.shape[1]}; use the same G")
    cfg = (
        list(config) if config is not None else launch_config(dim, length, B.shape[1], A.shape[1], u.dtype, u.shape[0])
    )
    per_group = dim // B.shape[1]
    v3 = v3_config(cfg)
    if v3:
        for key in ("fwd_bd", "bwd_bd"):
            if per_group % v3[key]:
                raise ValueError(
                    f"selective_scan_triton: {key}={v3[key]} must divide the channels per group {per_group}"
                )
        for key in ("fwd_bt", "bwd_bt"):
            if v3["block_l"] % v3[key]:
                raise ValueError(f"selective_scan_triton: block_l={v3['block_l']} must be a multiple of {key}")
    else:
        if len(cfg) not in (5, 7, 8, 9):
            raise ValueError("selective_scan_triton: config must have 5, 7, 8 or 9 entries, see default_config")
        bwd_variant(cfg, A.shape[1])  # validates the backward variant before the forward runs
        if per_group % cfg[1] or per_group % cfg[3]:
            raise ValueError(
                f"selective_scan_triton: block_d={cfg[1]}/{cfg[3]} must divide the channels per group {per_group}"
            )
    out, last, _ = selective_scan_fwd(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D.contiguous() if D is not None else None,
        z.contiguous() if z is not None else None,
        delta_bias.contiguous() if delta_bias is not None else None,
        initial_state.contiguous() if initial_state is not None else None,
        bool(delta_softplus),
        [int(c) for c in cfg],
    )
    return (out, last) if return_last_state else out


def selective_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decode step of the selective scan; ``state`` is updated in place.

    state ``[B, D, N]`` (contiguous, usually float32); x, dt, z ``[B, D]``; A ``[D, N]``;
    B, C ``[B, N]`` or ``[B, G, N]``; D, dt_bias ``[D]``. Returns ``y [B, D]`` in x's dtype.
    """
    if state.dim() != 3 or not state.is_contiguous():
        raise ValueError(
            f"selective_state_update_triton: state must be a contiguous [B, D, N], got {tuple(state.shape)}"
        )
    bsz, dim, n = state.shape
    if x.shape != (bsz, dim) or dt.shape != (bsz, dim):
        raise ValueError(f"selective_state_update_triton: x and dt must be [B, D] = {[bsz, dim]}")
    if A.shape != (dim, n):
        raise ValueError(f"selective_state_update_triton: A must be [D, N] = {[dim, n]}, got {list(A.shape)}")
    if B.dim() == 2:
        B = B.unsqueeze(1)
    if C.dim() == 2:
        C = C.unsqueeze(1)
    for name, t in (("B", B), ("C", C)):
        if t.shape[0] != bsz or t.shape[2] != n or dim % t.shape[1]:
            raise ValueError(
                f"selective_state_update_triton: {name} must be [B, N] or [B, G, N] with D % G == 0, got {list(t.shape)}"
            )
    if B.shape[1] != C.shape[1]:
        raise ValueError("selective_state_update_triton: B and C must have the same number of groups")
    return selective_state_update(
        state,
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D.contiguous() if D is not None else None,
        z.contiguous() if z is not None else None,
        dt_bias.contiguous() if dt_bias is not None else None,
        bool(dt_softplus),
    )
