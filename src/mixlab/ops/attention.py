"""Softmax attention with GQA, causal and sliding-window masks and KV-cache offsets; rotary embeddings.

Layout ``[B, T, H, D]`` throughout (the layout of every mixlab op), keys/values with ``Hkv`` heads,
``H % Hkv == 0`` (grouped-query attention: query head ``h`` reads key/value head ``h // (H // Hkv)``).

Positions. Keys are at positions ``0 .. S-1``; queries at ``q_offset .. q_offset + Tq - 1`` in the
same frame. ``q_offset=None`` aligns the queries with the *last* ``Tq`` keys (``S - Tq``), which is
what a KV cache needs: the cached keys followed by the new ones. A causal query at position ``p``
sees keys ``<= p``; with ``window=W`` only the last ``W`` of them, itself included (``p - W < j <= p``).

Backends. ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` when the
mask is the plain square causal one, a boolean mask otherwise). ``flex``: FlexAttention with a
block-sparse sliding-window mask (compiled on CUDA); used for full-sequence windowed attention,
where it skips the masked-out blocks instead of computing and discarding them. ``reference``: an
explicit softmax in the input dtype (float64-friendly; the readable definition). ``auto`` picks
``flex`` for windowed full-sequence attention on CUDA when available, else ``sdpa``. The op
backends ``chunked`` and ``triton`` (which the model passes to every mixer) mean ``auto`` here:
attention's fast paths are SDPA and FlexAttention.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from ._backend import probe_once

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "reference", "chunked", "triton")
_FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)  # head sizes FlexAttention's kernels handle on every version we support


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    q_offset: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``H % Hkv == 0``.
        causal: mask keys after each query's position. False: every query sees every key.
        window: sliding window (needs ``causal``): each query sees its last ``window`` keys, itself included.
        scale: score scale, default ``D ** -0.5``.
        q_offset: position of the first query in the keys' frame; None means ``S - Tq`` (queries are
            the last ``Tq`` keys, as when continuing after a KV cache). Must lie in ``[0, S - Tq]``.
        backend: ``auto`` | ``sdpa`` | ``flex`` | ``reference`` (``chunked``/``triton`` mean ``auto``).

    Returns:
        ``[B, Tq, H, Dv]`` in q's dtype.
    """
    _check_inputs(q, k, v, causal, window, q_offset, backend)
    tq, s = q.shape[1], k.shape[1]
    if q_offset is None:
        q_offset = s - tq
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if window is not None and window >= q_offset + tq:
        window = None  # no query reaches back that far: the window masks nothing
    impl = _resolve(backend, q, window, q_offset, tq, s)
    if impl == "reference":
        return _attention_reference(q, k, v, causal, window, scale, q_offset)
    if impl == "flex":
        return _attention_flex(q, k, v, window, scale)
    return _attention_sdpa(q, k, v, causal, window, scale, q_offset)


def attention_mask(
    tq: int, s: int, *, causal: bool = True, window: int | None = None, q_offset: int | None = None, device=None
) -> torch.Tensor | None:
    """Boolean mask ``[Tq, S]`` (True = attend) for the given positions; None when nothing is masked."""
    if q_offset is None:
        q_offset = s - tq
    if not causal:
        return None
    qpos = torch.arange(q_offset, q_offset + tq, device=device)[:, None]
    kpos = torch.arange(s, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (kpos > qpos - window)
    return mask


# ----------------------------------------------------------------------------------------------
# rotary position embeddings (Llama / Hugging Face "rotate half" convention)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables ``[T, head_dim]`` for integer ``positions [T]``.

    Frequency ``i`` (of ``head_dim / 2``) is ``theta ** (-2i / head_dim)``; the table repeats the
    ``head_dim / 2`` angles twice, matching :func:`apply_rope`'s rotate-half pairing ``(i, i + D/2)``.
    Angles are computed in float64 (float32 where the device has none, i.e. MPS): at positions in
    the hundreds of thousands a float32 product ``pos * freq`` is off by milliradians.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"rope: head_dim={head_dim} must be even")
    wide = torch.float32 if positions.device.type == "mps" else torch.float64
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=wide) / head_dim)
    angles = positions.to(wide)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    out_dtype = dtype if dtype is not None else torch.get_default_dtype()
    return angles.cos().to(out_dtype), angles.sin().to(out_dtype)


_ROPE_TABLES: dict[tuple[int, float, torch.device, torch.dtype | None], tuple[torch.Tensor, torch.Tensor]] = {}


@torch.compiler.disable
def rope_table(
    length: int, head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None, dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[n, head_dim]`` for positions ``0 .. n-1``, ``n >= length`` (a power of two, at least 1024):
    :func:`rope_cos_sin`'s values, computed once per (head_dim, theta, device, dtype) and grown when a longer
    table is asked for; callers slice or gather their positions.

    Kept out of compiled graphs on purpose: traced into one, inductor fuses the table's float64 cos/sin into
    every use, evaluating them per element of ``[B, T, H, D]`` instead of once per ``[T, D]`` (a fifth of a
    compiled 1.3b Transformer step on an H100 before this table existed).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (head_dim, float(theta), device, dtype)
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        n = max(1024, 1 << max(0, int(length) - 1).bit_length())
        with torch.inference_mode(False), torch.no_grad():  # usable by autograd even if first built under inference
            table = rope_cos_sin(torch.arange(n, device=device), head_dim, theta, dtype=dtype)
        if isinstance(table[0], torch._subclasses.fake_tensor.FakeTensor):
            return table  # a tracing pass (fake tensors): nothing real to keep
        _ROPE_TABLES[key] = table
    return table


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by the angles of ``cos, sin`` (``[T, D]`` or ``[B, T, D]``): ``x cos + rot(x) sin``."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    elif cos.dim() == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    else:
        raise ValueError(f"apply_rope: cos/sin must be [T, D] or [B, T, D], got {tuple(cos.shape)}")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# implementations


def _check_inputs(q, k, v, causal, window, q_offset, backend) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: backend={backend!r} is not one of {ATTENTION_BACKENDS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, tq, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k must be [B={b}, S, Hkv, D={d}], got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: v must be [B, S, Hkv, Dv] with k's B, S, Hkv = {tuple(k.shape[:3])}")
    hkv = k.shape[2]
    if h % hkv != 0:
        raise ValueError(f"attention: query heads {h} must be a multiple of key/value heads {hkv} (GQA)")
    s = k.shape[1]
    if q_offset is not None and not 0 <= q_offset <= s - tq:
        raise ValueError(
            f"attention: q_offset={q_offset} must be in [0, S - Tq] = [0, {s - tq}] "
            "(every query must be one of the key positions)"
        )
    if window is not None:
        if window <= 0:
            raise ValueError(f"attention: window={window} must be a positive number of tokens (or None)")
        if not causal:
            raise ValueError("attention: window needs causal=True (a sliding window looks back only)")


def _resolve(backend: str, q: torch.Tensor, window, q_offset: int, tq: int, s: int) -> str:
    if backend in ("sdpa", "flex", "reference"):
        return backend
    # auto: FlexAttention pays off for the block-sparse mask of full-sequence windowed attention.
    # It is compiled per (length, window); cached decoding (q_offset > 0) stays on masked SDPA,
    # where the mask is small and changes every call.
    if (
        window is not None
        and q.is_cuda
        and q_offset == 0
        and tq == s
        and q.shape[-1] in _FLEX_HEAD_DIMS
        and _flex_available()
    ):
        return "flex"
    return "sdpa"


@probe_once
def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtins without a signature: probe it
        try:
            x = torch.zeros(1, 2, 1, 2)
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, Hkv, S, D] -> [B, Hkv * groups, S, D]`` (query head h reads kv head h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attention_sdpa(q, k, v, causal, window, scale, q_offset) -> torch.Tensor:
    tq, s = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kt, vt = kt.to(qt.dtype), vt.to(qt.dtype)
    groups = qt.shape[1] // kt.shape[1]
    kw = {}
    if groups > 1:
        if _sdpa_has_gqa():
            kw["enable_gqa"] = True
        else:
            kt, vt = _expand_kv(kt, groups), _expand_kv(vt, groups)
    mask, is_causal = None, False
    if causal:
        if window is None and q_offset == 0 and tq == s:
            is_causal = True  # SDPA's own causal mask (top-left aligned): exact for square inputs
        elif window is None and q_offset == s - 1 and tq == 1:
            pass  # one query at the last position sees every key
        else:
            mask = attention_mask(tq, s, causal=True, window=window, q_offset=q_offset, device=q.device)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale, **kw)
    return o.transpose(1, 2)


def _attention_reference(q, k, v, causal, window, scale, q_offset) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    k = k.to(q.dtype).repeat_interleave(groups, dim=2)
    v = v.to(q.dtype).repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, q_offset=q_offset, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


@probe_once
def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def _flex_raw():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materialises the full score matrix; compiled, it is a fused block-sparse kernel.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


@torch.compiler.disable  # built once per (T, window, device) and cached, never re-traced into a compiled block
@functools.lru_cache(maxsize=32)
def _sliding_window_block_mask(t: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=device)


def _attention_flex(q, k, v, window, scale) -> torch.Tensor:
    """Full-sequence (q_offset 0, Tq == S) causal attention with an optional sliding window."""
    t = q.shape[1]
    if q.shape[1] != k.shape[1]:
        raise ValueError("attention: backend='flex' handles full sequences only (Tq == S, q_offset 0)")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
    w = window if window is not None else t  # a window covering the sequence is plain causal
    block_mask = _sliding_window_block_mask(t, w, q.device)
    gqa = qt.shape[1] != kt.shape[1]
    # inside a compiled block the enclosing compile fuses flex_attention itself
    flex = _flex_raw() if torch.compiler.is_compiling() else _flex_fn(q.device.type)
    o = flex(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


__all__ = [
    "ATTENTION_BACKENDS",
    "apply_rope",
    "attention",
    "attention_mask",
    "rope_cos_sin",
    "rope_table",
    "rotate_half",
]
