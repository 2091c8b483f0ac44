"""Named model configurations, matched in parameter count across architectures.

``<arch>-<size>`` with arch in :data:`ARCHS` and size in :data:`SIZES`:

- ``tiny`` (≤ 5M parameters, byte vocabulary of 256: for tests, CPU runs and the embedded-corpus
  default) and ``125m``/``350m``/``1.3b`` (within ±5% of the label with a 32,000-token vocabulary,
  the Llama-2 tokenizer's size that the Gated DeltaNet paper trains with). Embeddings are tied.
- Shapes follow the papers' models: d_model 768 / 1024 / 2048 as GPT-3 and mamba_ssm's
  130m / 370m / 1.4b; Transformer++ is Llama-style (RoPE, SwiGLU of 8/3·d rounded up to 256,
  RMSNorm, no biases); pure Mamba/Mamba2 stacks are mixer-only blocks with twice the layers, as in
  mamba_ssm; DeltaNet has d/head_dim heads of 128 (64 at 125m); Gated DeltaNet keeps fla's budget
  (6 heads, key dim 0.75·d, value dim 1.5·d via expand_v 2: head_dim 256 at 1.3b, scaled down
  with d); the hybrids tile ``GS`` (H1) and ``MGS`` (H2) with 2048-token sliding-window attention.
  Layer counts are those that land closest to the label (patterns tile, so a count need not be a
  multiple of the pattern length).

Plus the university report's three models (``report-*``). Their FFN×1.3 is Llama-3's
``ffn_dim_multiplier`` (SwiGLU hidden = 1.3 · 8/3 · d rounded up to 1024 = 9216 at d 2560), so we
assume Llama-3's 128,256-token vocabulary with untied embeddings, which lands the three models at
their stated sizes; the report's Mamba (d_state 64, head 64, chunk 64, A ∈ [1, 16]) is Mamba2/SSD,
and its L32 counts Transformer-equivalent layers, i.e. 64 mixer-only blocks as in mamba_ssm.

``mixlab models`` prints every preset with its exact parameter count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from ..config import (
    AttentionConfig,
    DeltaNetConfig,
    GatedDeltaNetConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
)

ARCHS = ("transformer", "mamba", "mamba2", "deltanet", "gated_deltanet", "gdn_h1", "gdn_h2")
SIZES = ("tiny", "125m", "350m", "1.3b")

VOCAB = 32000  # Llama-2 tokenizer size, as in the Gated DeltaNet paper
TINY_VOCAB = 256  # byte-level
SWA_WINDOW = 2048  # sliding window of the hybrids' ``S`` layers (Gated DeltaNet paper)
TINY_SWA_WINDOW = 128  # scaled down with everything else, so short tiny-model contexts still see a window

#: size -> d_model, attention heads (head_dim 64, 128 at 1.3b), DeltaNet heads, Gated DeltaNet head_dim (6 heads)
_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (256, 4, 4, 32),
    "125m": (768, 12, 12, 96),
    "350m": (1024, 16, 8, 128),
    "1.3b": (2048, 16, 16, 256),
}
#: arch -> pattern and number of layers per size
_LAYERS: dict[str, tuple[str, dict[str, int]]] = {
    "transformer": ("A", {"tiny": 4, "125m": 14, "350m": 24, "1.3b": 24}),
    "mamba": ("m", {"tiny": 8, "125m": 26, "350m": 48, "1.3b": 48}),
    "mamba2": ("M", {"tiny": 8, "125m": 26, "350m": 48, "1.3b": 48}),
    "deltanet": ("D", {"tiny": 4, "125m": 14, "350m": 24, "1.3b": 24}),
    "gated_deltanet": ("G", {"tiny": 4, "125m": 12, "350m": 21, "1.3b": 21}),
    "gdn_h1": ("GS", {"tiny": 4, "125m": 13, "350m": 22, "1.3b": 22}),
    "gdn_h2": ("MGS", {"tiny": 4, "125m": 13, "350m": 22, "1.3b": 22}),
}
GDN_HEADS = 6


def _arch_size_config(arch: str, size: str) -> ModelConfig:
    d, attn_heads, dn_heads, gdn_head_dim = _SHAPES[size]
    pattern, layers = _LAYERS[arch]
    tiny = size == "tiny"
    return ModelConfig(
        name=f"{arch}-{size}",
        vocab_size=TINY_VOCAB if tiny else VOCAB,
        d_model=d,
        n_layers=layers[size],
        pattern=pattern,
        d_intermediate=0 if arch in ("mamba", "mamba2") else None,
        tie_embeddings=True,
        attention=AttentionConfig(n_heads=attn_heads, window=TINY_SWA_WINDOW if tiny else SWA_WINDOW),
        mamba=MambaConfig(),
        mamba2=Mamba2Config(),
        deltanet=DeltaNetConfig(n_heads=dn_heads, head_dim=d // dn_heads),
        gated_deltanet=GatedDeltaNetConfig(n_heads=GDN_HEADS, head_dim=gdn_head_dim, expand_v=2.0),
    )


_REPORT_D, _REPORT_VOCAB, _REPORT_FFN = 2560, 128256, 9216


def _report_transformer() -> ModelConfig:
    """Transformer 3.5B: L32, d2560, 32 heads / 8 KV heads, RoPE θ 5e5, SwiGLU 9216 (FFN×1.3)."""
    return ModelConfig(
        name="report-transformer-3.5b",
        vocab_size=_REPORT_VOCAB,
        d_model=_REPORT_D,
        n_layers=32,
        pattern="A",
        d_intermediate=_REPORT_FFN,
        tie_embeddings=False,
        attention=AttentionConfig(n_heads=32, n_kv_heads=8, rope_theta=500000.0),
    )


def _report_deltanet() -> ModelConfig:
    """DeltaNet 3.7B: the Transformer's backbone with DeltaNet mixers (β, chunk 64, conv 4), 32 heads."""
    cfg = _report_transformer()
    cfg.name = "report-deltanet-3.7b"
    cfg.pattern = "D"
    cfg.deltanet = DeltaNetConfig(n_heads=32, head_dim=_REPORT_D // 32, conv_size=4, chunk_size=64)
    return cfg


def _report_mamba() -> ModelConfig:
    """Mamba 3.2B: d2560, d_state 64, head 64, conv 4, chunk 64, A ∈ [1, 16], Δ ∈ [1e-3, 0.1], expand 2;
    64 mixer-only Mamba2 blocks (the report's 32 layers counted as Transformer-equivalent)."""
    return ModelConfig(
        name="report-mamba-3.2b",
        vocab_size=_REPORT_VOCAB,
        d_model=_REPORT_D,
        n_layers=64,
        pattern="M",
        d_intermediate=0,
        tie_embeddings=False,
        mamba2=Mamba2Config(
            d_state=64, d_conv=4, expand=2, headdim=64, A_init_range=(1.0, 16.0), dt_min=1e-3, dt_max=0.1, chunk_size=64
        ),
    )


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    f"{arch}-{size}": (lambda a=arch, s=size: _arch_size_config(a, s)) for arch in ARCHS for size in SIZES
}
_PRESETS.update(
    {
        "report-transformer-3.5b": _report_transformer,
        "report-deltanet-3.7b": _report_deltanet,
        "report-mamba-3.2b": _report_mamba,
    }
)


def list_presets() -> list[str]:
    """Every preset name: ``<arch>-<size>`` in ARCHS × SIZES order, then the report's models."""
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`~mixlab.config.ModelConfig` for preset ``name`` (safe to modify)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(_PRESETS)}")
    return copy.deepcopy(_PRESETS[name]())


def preset_label(name: str) -> float | None:
    """The parameter count a preset's name promises (``125m`` -> 125e6); None for ``tiny``."""
    size = name.rsplit("-", 1)[-1]
    if size == "tiny":
        return None
    scale = {"m": 1e6, "b": 1e9}[size[-1]]
    return float(size[:-1]) * scale
