"""Softmax attention layer (Transformer++ / Llama style): GQA, RoPE, optional sliding window, KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import apply_rope, attention, rope_cos_sin, rope_table
from .base import Mixer


@dataclass
class AttentionCache:
    """Decode state of one attention layer.

    ``k``, ``v``: ``[B, L, Hkv, D]`` keys (after RoPE) and values. A full cache (``ring=False``) holds
    position ``p`` in slot ``p`` and ``L = max_len``. A sliding-window cache (``ring=True``) is a ring
    buffer of ``L = window`` slots holding position ``p`` in slot ``p % window``: memory stays constant
    however long the context grows. ``pos``: number of tokens consumed so far.

    ``pos`` may also be a LongTensor ``[B]``, one position per row (set it so after ``init_cache``):
    rows then decode from different positions (prompts of different lengths in one batch), and a
    one-token step reads no Python int, so it can be captured in a CUDA graph. The layer updates
    that tensor in place. (``mixlab.generate`` does this; see :meth:`Attention._attend_rows`.)
    """

    #: ``pos`` may be a per-row LongTensor ``[B]`` (read by ``mixlab.generate``)
    supports_row_positions: ClassVar[bool] = True

    k: torch.Tensor
    v: torch.Tensor
    ring: bool
    pos: int | torch.Tensor = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


class Attention(Mixer):
    """Causal multi-head attention with grouped-query heads and rotary embeddings.

    ``x [B, T, d_model] -> [B, T, d_model]``: ``q = x Wq`` ``[B, T, H, D]``, ``k, v = x Wk, x Wv``
    ``[B, T, Hkv, D]``, RoPE on q and k, softmax attention (sliding window when ``window`` is set),
    ``o_proj``. ``window=None`` is full causal attention (``A`` layers); ``S`` layers get a window.
    """

    residual_out_proj = ("o_proj",)

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        window: int | None = None,
        qkv_bias: bool = False,
        *,
        layer_idx: int | None = None,
        backend: str = "auto",
        norm_eps: float = 1e-5,  # accepted for the common mixer signature; attention has no norm
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"Attention: n_kv_heads={n_kv_heads} must be positive and divide n_heads={n_heads}")
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"Attention: d_model={d_model} is not divisible by n_heads={n_heads}; set head_dim")
            head_dim = d_model // n_heads
        if head_dim % 2 != 0:
            raise ValueError(f"Attention: head_dim={head_dim} must be even for RoPE")
        if window is not None and window <= 0:
            raise ValueError(f"Attention: window={window} must be a positive number of tokens or None (full causal)")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.rope_theta, self.window, self.layer_idx = rope_theta, window, layer_idx
        # Attention's fast paths are SDPA/FlexAttention; "reference" asks for the explicit softmax.
        self.backend = "reference" if backend == "reference" else "auto"
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False, **kw)

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AttentionCache:
        """KV cache for ``batch_size`` sequences of up to ``max_len`` tokens (unbounded for windowed layers)."""
        device = self.k_proj.weight.device if device is None else device
        dtype = self.k_proj.weight.dtype if dtype is None else dtype
        ring = self.window is not None and self.window < max_len
        length = self.window if ring else max_len
        shape = (batch_size, length, self.n_kv_heads, self.head_dim)
        return AttentionCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            ring=ring,
        )

    def forward(self, x: torch.Tensor, cache: AttentionCache | None = None) -> torch.Tensor:
        """``x [B, T, d_model]``; with ``cache``, continue the cached sequence (and update the cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if cache is not None and isinstance(cache.pos, torch.Tensor):
            return self.o_proj(self._forward_rows(q, k, v, cache).reshape(b, t, self.n_heads * self.head_dim))
        start = 0 if cache is None else cache.pos
        if cache is None:  # training / full-sequence: slices of a cached table (no trig inside compiled graphs)
            cos, sin = rope_table(t, self.head_dim, self.rope_theta, x.device, q.dtype)
            cos, sin = cos[:t], sin[:t]
        else:
            cos, sin = rope_cos_sin(
                torch.arange(start, start + t, device=x.device), self.head_dim, self.rope_theta, dtype=q.dtype
            )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            o = attention(q, k, v, causal=True, window=self.window, backend=self.backend)
        else:
            o = self._attend_cached(q, k, v, cache)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.head_dim))

    def _attend_cached(self, q, k, v, cache: AttentionCache) -> torch.Tensor:
        b, t = q.shape[:2]
        if cache.k.shape[0] != b:
            raise ValueError(f"Attention: cache was made for batch {cache.k.shape[0]}, input has batch {b}")
        pos, cap = cache.pos, cache.capacity
        if not cache.ring:
            if pos + t > cap:
                raise ValueError(
                    f"Attention: KV cache holds {cap} tokens, {pos} used, {t} more given; "
                    "allocate init_cache(..., max_len=...) for the whole sequence"
                )
            cache.k[:, pos : pos + t] = k
            cache.v[:, pos : pos + t] = v
            keys, vals = cache.k[:, : pos + t], cache.v[:, : pos + t]
            o = attention(q, keys, vals, causal=True, window=self.window, q_offset=pos, backend=self.backend)
        elif t == 1:
            # One step: after writing slot pos % W the ring holds exactly the keys this query sees
            # (the last W positions, itself included, or all of them while pos < W). Softmax
            # attention does not depend on key order, so no mask and no reordering are needed.
            slot = pos % cap
            cache.k[:, slot] = k[:, 0]
            cache.v[:, slot] = v[:, 0]
            n = min(pos + 1, cap)
            o = attention(q, cache.k[:, :n], cache.v[:, :n], causal=False, backend=self.backend)
        else:
            # Prefill: the cached keys in time order, then the new ones, under the window mask.
            if pos <= cap:
                prev_k, prev_v = cache.k[:, :pos], cache.v[:, :pos]
            else:
                order = (pos + torch.arange(cap, device=cache.k.device)) % cap  # positions pos-W .. pos-1
                prev_k, prev_v = cache.k[:, order], cache.v[:, order]
            keys = torch.cat([prev_k.to(k.dtype), k], dim=1)
            vals = torch.cat([prev_v.to(v.dtype), v], dim=1)
            o = attention(
                q, keys, vals, causal=True, window=self.window, q_offset=prev_k.shape[1], backend=self.backend
            )
            m = min(t, cap)  # only the last W new tokens can still be seen later
            slots = (pos + t - m + torch.arange(m, device=cache.k.device)) % cap
            cache.k[:, slots] = k[:, t - m :].to(cache.k.dtype)
            cache.v[:, slots] = v[:, t - m :].to(cache.v.dtype)
        cache.pos = pos + t
        return o

    def _forward_rows(self, q, k, v, cache: AttentionCache) -> torch.Tensor:
        """RoPE + cached attention when ``cache.pos`` is a per-row LongTensor ``[B]``.

        Rows that all sit at one position with several new tokens (a prefill) take the shared-position
        path (one host sync to check); otherwise :meth:`_attend_rows`.
        """
        rows_pos = cache.pos
        if q.shape[1] > 1 and bool((rows_pos == rows_pos[0]).all()):
            start = int(rows_pos[0])
            cos, sin = rope_cos_sin(
                torch.arange(start, start + q.shape[1], device=q.device), self.head_dim, self.rope_theta, dtype=q.dtype
            )
            cache.pos = start
            try:
                o = self._attend_cached(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache)
            finally:
                rows_pos.fill_(cache.pos)
                cache.pos = rows_pos
            return o
        return self._attend_rows(q, k, v, cache)

    def _attend_rows(self, q, k, v, cache: AttentionCache) -> torch.Tensor:
        """Attention with one position per row: row ``b``'s new tokens sit at ``cache.pos[b] + 0..T-1``.

        Writes the keys/values at their slots (``pos % window`` in a ring buffer) and attends over the
        whole cache under a per-row mask (causal, window, slots not yet written), so shapes and control
        flow never depend on the positions' values: capturable in a CUDA graph. A full cache must have
        room (``pos + T <= max_len``; not checked, that would need a host sync). A ring buffer takes one
        token per call here (more could overwrite keys that earlier new tokens still need).
        """
        b, t = q.shape[:2]
        cap = cache.capacity
        if cache.ring and t > 1:
            raise ValueError(
                "Attention: a sliding-window cache with per-row positions takes one token per call when "
                "the rows sit at different positions; prefill rows of one length together"
            )
        if cache.k.shape[0] != b:
            raise ValueError(f"Attention: cache was made for batch {cache.k.shape[0]}, input has batch {b}")
        qpos = cache.pos[:, None] + torch.arange(t, device=q.device)  # [B, T]
        cos, sin = rope_cos_sin(qpos.reshape(-1), self.head_dim, self.rope_theta, dtype=q.dtype)
        q = apply_rope(q, cos.view(b, t, -1), sin.view(b, t, -1))
        k = apply_rope(k, cos.view(b, t, -1), sin.view(b, t, -1))
        slots = qpos % cap if cache.ring else qpos
        rows = torch.arange(b, device=q.device)[:, None].expand(b, t)
        cache.k[rows, slots] = k.to(cache.k.dtype)
        cache.v[rows, slots] = v.to(cache.v.dtype)
        j = torch.arange(cap, device=q.device)
        if cache.ring:
            last = qpos[:, -1:]
            kpos = last - (last - j) % cap  # [B, cap]: the position each slot holds now
        else:
            kpos = j.expand(b, cap)
        kpos = kpos[:, None, :]
        visible = (kpos <= qpos[:, :, None]) & (kpos >= 0)  # [B, T, cap]
        if self.window is not None:
            visible = visible & (kpos > qpos[:, :, None] - self.window)
        qt, kt, vt = q.transpose(1, 2), cache.k.transpose(1, 2).to(q.dtype), cache.v.transpose(1, 2).to(q.dtype)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible[:, None])
        cache.pos.add_(t)
        return o.transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"rope_theta={self.rope_theta}, window={self.window}"
        )
