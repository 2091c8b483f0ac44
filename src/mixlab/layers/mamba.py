"""Mamba (the selective state-space mixer) over :func:`mixlab.ops.selective_scan`.

Parameter names and shapes follow mamba_ssm's ``Mamba`` so that its checkpoints map one to one
(``d_inner = expand * d_model``, ``R = dt_rank``, ``N = d_state``, ``W = d_conv``):
``in_proj`` ``[2*d_inner, d_model]`` (rows: x then z), ``conv1d.weight`` ``[d_inner, 1, W]`` and
``conv1d.bias`` (depthwise), ``x_proj`` ``[R + 2N, d_inner]`` (rows: dt, B, C), ``dt_proj``
``[d_inner, R]`` with bias, ``A_log`` ``[d_inner, N]``, ``D`` ``[d_inner]``, ``out_proj``
``[d_model, d_inner]``.

Forward: ``x, z = in_proj(u)``; ``x = silu(conv(x))``; ``dt, B, C = x_proj(x)``;
``dt = dt_proj.weight @ dt`` (its bias is the scan's ``delta_bias``, softplus applied inside);
``y = selective_scan(x, dt, -exp(A_log), B, C, D, z)`` (so ``y = (C.h + D x) * silu(z)``);
``out_proj(y)``.

Decoding (see :func:`decode_path`): with a cache, no gradient and few new tokens, the scan is run as
its plain recurrence on the cached state, in place: on CUDA one token is the fused conv-update and
``selective_state_update`` Triton kernels, elsewhere a few vectorised PyTorch ops per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv import causal_conv1d
from ..ops.selective_scan import selective_scan
from .base import Mixer
from .common import cached_input, conv_steps, decode_path, inverse_softplus, sample_dt, state_dtype


def selective_scan_steps(
    state: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The selective scan as its recurrence over a few tokens, updating ``state`` in place (no autograd).

    state ``[b, D, N]`` (float32/64, contiguous); u, dt, z ``[b, T, D]`` (channels last, as the layer
    holds them; dt before its bias and softplus); A ``[D, N]``; B, C ``[b, T, N]``; D, dt_bias ``[D]``.
    ``h = exp(dt A) h + dt u B``; ``y = C.h + D u``; ``y *= silu(z)``. Returns ``y [b, T, D]`` in the
    state's dtype.
    """
    acc = state.dtype
    u, dt, B, C = u.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    dt = F.softplus(dt)
    # time-major: every per-token slice is one contiguous block
    dtT, BT = dt.transpose(0, 1), B.transpose(0, 1)
    decay = torch.exp(dtT[..., None] * A.to(acc))  # [T, b, D, N]
    inp = (dtT * u.transpose(0, 1))[..., None] * BT[:, :, None, :]  # [T, b, D, N]
    CT = C.transpose(0, 1).unsqueeze(2).contiguous()  # [T, b, 1, N]
    hT = state.transpose(1, 2)
    ys = []
    for t in range(u.shape[1]):
        state.mul_(decay[t]).add_(inp[t])
        # C^T h^T, a row times a matrix: bmm is several times slower for the column h C on the CPU
        ys.append(torch.bmm(CT[t], hT))  # [b, 1, D]
    y = torch.cat(ys, dim=1)  # [b, T, D]
    if D is not None:
        y = y + u * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y


@dataclass
class MambaCache:
    """Decode state of a Mamba layer (updated in place by the layer's forward).

    ``conv_state``: the last ``d_conv - 1`` conv inputs ``[B, d_inner, d_conv - 1]`` (layer dtype);
    ``ssm_state``: ``[B, d_inner, d_state]`` in float32 (float64 for a float64 layer);
    ``pos``: tokens consumed so far (a counter; the math reads the states only).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    pos: int = 0


class Mamba(Mixer):
    """Mamba mixer: ``x [B, T, d_model] -> [B, T, d_model]`` (mamba_ssm's ``Mamba`` parameterisation)."""

    residual_out_proj = ("out_proj",)

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        *,
        layer_idx: int | None = None,
        backend: str = "auto",
        norm_eps: float = 1e-5,  # accepted for the common mixer signature; Mamba has no norm
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if d_model <= 0 or d_state <= 0 or expand <= 0:
            raise ValueError(f"Mamba: d_model={d_model}, d_state={d_state}, expand={expand} must be positive")
        if d_conv < 1:
            raise ValueError(f"Mamba: d_conv={d_conv} must be >= 1")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank <= 0:
            raise ValueError(f"Mamba: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.layer_idx, self.backend, self.norm_eps = layer_idx, backend, norm_eps

        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **kw
        )
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True, **kw)
        sdt = state_dtype(dtype)  # A_log and D stay in float32 as in mamba_ssm
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=sdt))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=sdt))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's init of the conv, dt_proj (weight U(+-dt_rank^-0.5), bias = softplus^-1 of
        log-uniform dt), A_log = log(1..N) per channel and D = 1. in_proj/x_proj/out_proj are the model's job."""
        self._mark_parameters()
        self.conv1d.reset_parameters()
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dev = self.dt_proj.bias.device
        dt = sample_dt(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor, dev, torch.float32)
        self.dt_proj.bias.copy_(inverse_softplus(dt))
        A = torch.arange(1, self.d_state + 1, device=dev, dtype=torch.float32)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, self.d_state))
        self.D.fill_(1.0)

    def _mark_parameters(self) -> None:
        # Flags live on the Parameter objects, which ``to_empty()`` replaces: set them again at every init.
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True
        # dt_proj is initialised here, not by the model's generic Linear init
        self.dt_proj.weight._no_reinit = True
        self.dt_proj.bias._no_reinit = True

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MambaCache:
        """Zero decode state for ``batch_size`` sequences (its size does not depend on ``max_len``)."""
        p = self.in_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype(dtype)),
        )

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """``x [B, T, d_model]``; with ``cache``, continue the cached sequences and update the cache in place."""
        B, T, _ = x.shape
        if cache is not None and cache.ssm_state.shape[0] != B:
            raise ValueError(f"Mamba: cache was made for batch {cache.ssm_state.shape[0]}, input has batch {B}")
        path = decode_path(self, x, cache)
        if path == "plain" or (path == "triton" and T == 1 and 2 <= self.d_conv <= 4):  # the conv kernel's widths
            return self._step(x, cache, path)
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        keep = cache is not None
        xs, conv_state = causal_conv1d(
            xs,
            self.conv1d.weight,
            self.conv1d.bias,
            activation="silu",
            initial_state=cached_input(cache.conv_state) if keep else None,
            output_final_state=keep,
        )
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes in as delta_bias, before the softplus
        acc = state_dtype(self.A_log.dtype)
        out = selective_scan(
            xs.transpose(1, 2),
            dt.transpose(1, 2),
            -torch.exp(self.A_log.to(acc)),
            Bm.transpose(1, 2),
            Cm.transpose(1, 2),
            D=self.D.to(acc),
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.to(acc),
            delta_softplus=True,
            initial_state=cached_input(cache.ssm_state) if keep else None,
            return_last_state=keep,
            backend=self.backend,
        )
        if keep:
            y, last = out
            with torch.no_grad():
                cache.ssm_state.copy_(last)
                cache.conv_state.copy_(conv_state)
            cache.pos += T
        else:
            y = out
        return self.out_proj(y.transpose(1, 2).to(x.dtype))

    def _step(self, x: torch.Tensor, cache: MambaCache, path: str) -> torch.Tensor:
        """The cached forward as a direct recurrence (no autograd): ``"triton"`` for one token (fused
        kernels, states updated in place), ``"plain"`` for a few (:func:`selective_scan_steps`)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        acc = state_dtype(self.A_log.dtype)
        A = -torch.exp(self.A_log.to(acc))
        if path == "triton":
            from ..ops.conv.triton import causal_conv1d_update_triton
            from ..ops.selective_scan.triton import selective_state_update_triton

            w, b = self.conv1d.weight, self.conv1d.bias
            xs = causal_conv1d_update_triton(xs[:, 0], cache.conv_state, w, b, "silu")  # [B, d_inner]
            dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.linear(dt, self.dt_proj.weight)
            y = selective_state_update_triton(
                cache.ssm_state, xs, dt, A, Bm, Cm, self.D, z[:, 0], self.dt_proj.bias, dt_softplus=True
            )[:, None]
        else:
            xs = conv_steps(xs, cache.conv_state, self.conv1d.weight, self.conv1d.bias)
            dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.linear(dt, self.dt_proj.weight)
            y = selective_scan_steps(cache.ssm_state, xs, dt, A, Bm, Cm, self.D, z, self.dt_proj.bias)
        cache.pos += x.shape[1]
        return self.out_proj(y.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"dt_rank={self.dt_rank}, backend={self.backend!r}"
        )


__all__ = ["Mamba", "MambaCache", "selective_scan_steps"]
