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


def _state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """Dtype of SSM states and of A_log/D: float32, or float64 for a float64 layer."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``y`` with ``softplus(y) = x`` (x > 0), stable for small x: ``x + log(-expm1(-x))``."""
    return x + torch.log(-torch.expm1(-x))


def sample_dt(n: int, dt_min: float, dt_max: float, floor: float, device, dtype) -> torch.Tensor:
    """``n`` time steps log-uniform in ``[dt_min, dt_max]``, floored at ``floor`` (mamba_ssm's init)."""
    u = torch.rand(n, device=device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt.to(dtype)


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
        sdt = _state_dtype(dtype)  # A_log and D stay in float32 as in mamba_ssm
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
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=_state_dtype(dtype)),
        )

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """``x [B, T, d_model]``; with ``cache``, continue the cached sequences and update the cache in place."""
        B, T, _ = x.shape
        if cache is not None and cache.ssm_state.shape[0] != B:
            raise ValueError(f"Mamba: cache was made for batch {cache.ssm_state.shape[0]}, input has batch {B}")
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, d_inner] each
        keep = cache is not None
        xs, conv_state = causal_conv1d(
            xs,
            self.conv1d.weight,
            self.conv1d.bias,
            activation="silu",
            initial_state=cache.conv_state if keep else None,
            output_final_state=keep,
        )
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes in as delta_bias, before the softplus
        acc = _state_dtype(self.A_log.dtype)
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
            initial_state=cache.ssm_state if keep else None,
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

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"dt_rank={self.dt_rank}, backend={self.backend!r}"
        )


__all__ = ["Mamba", "MambaCache", "inverse_softplus", "sample_dt"]
