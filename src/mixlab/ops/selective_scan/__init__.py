"""Mamba's selective scan, with mamba_ssm's ``selective_scan_fn`` semantics.

u, delta, z ``[B, D, L]``; A ``[D, N]``; B, C ``[B, N, L]`` or grouped ``[B, G, N, L]``.
``delta = softplus(delta + delta_bias)`` if asked; per channel d and state n:
``h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t``; ``y_t = C_t . h_t + D u_t``; ``y *= silu(z)``.
The state ``[B, D, N]`` is float32.
"""

from __future__ import annotations

import torch

from .._backend import plain_precision, resolve_backend


def selective_scan(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the selective scan. Returns ``y [B, D, L]`` (u's dtype), or ``(y, last_state [B, D, N])``."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kwargs = dict(
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_last_state=return_last_state,
    )
    impl = resolve_backend(backend, u)
    if impl == "reference":
        from .reference import selective_scan_reference

        with plain_precision(u):
            return selective_scan_reference(u, delta, A, B, C, **kwargs)
    if impl == "chunked":
        from .chunked import selective_scan_chunked

        with plain_precision(u):
            return selective_scan_chunked(u, delta, A, B, C, **kwargs)
    from .triton import selective_scan_triton

    return selective_scan_triton(u, delta, A, B, C, **kwargs)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [B, D, L], got {tuple(u.shape)}")
    b, d, l = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must be [B, D, L] = {list(u.shape)}, got {list(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be [D, N] with D={d}, got {list(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 3 and t.shape == (b, n, l)) or (
            t.dim() == 4 and t.shape[0] == b and t.shape[2:] == (n, l) and d % t.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be [B, N, L] = {[b, n, l]} or [B, G, N, L] with D % G == 0, "
                f"got {list(t.shape)}"
            )
    if D is not None and D.shape != (d,):
        raise ValueError(f"selective_scan: D must be [D] = [{d}], got {list(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must be [B, D, L] = {list(u.shape)}, got {list(z.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise ValueError(f"selective_scan: delta_bias must be [D] = [{d}], got {list(delta_bias.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(
            f"selective_scan: initial_state must be [B, D, N] = {[b, d, n]}, got {list(initial_state.shape)}"
        )


__all__ = ["selective_scan"]
