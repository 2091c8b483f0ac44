"""The configuration tree: plain dataclasses, validated in ``__post_init__``.

Library code only ever sees these dataclasses. ``ModelConfig`` describes a language model: an
embedding, a stack of blocks whose mixers follow a tiled layer *pattern*, a final norm and an LM
head. Each mixer family has its own sub-config; a model only uses the ones its pattern names.

Pattern letters: ``A`` attention, ``S`` sliding-window attention, ``m`` Mamba, ``M`` Mamba2,
``D`` DeltaNet, ``G`` Gated DeltaNet. The pattern is tiled over ``n_layers``: ``"GS"`` with
``n_layers=4`` is ``G S G S`` (Gated DeltaNet-H1), ``"MGS"`` is H2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIXER_LETTERS = {
    "A": "attention",
    "S": "sliding-window attention",
    "m": "mamba",
    "M": "mamba2",
    "D": "deltanet",
    "G": "gated_deltanet",
}
OP_BACKENDS = ("auto", "reference", "chunked", "triton")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class AttentionConfig:
    """Softmax attention (Transformer++): GQA, RoPE, optional sliding window for ``S`` layers."""

    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer heads: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    window: int = 2048  # window of ``S`` layers, in tokens (the query attends to `window` keys)
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        _check(self.n_heads > 0, "model.attention.n_heads must be positive")
        kv = self.n_kv_heads if self.n_kv_heads is not None else self.n_heads
        _check(
            kv > 0 and self.n_heads % kv == 0,
            f"model.attention.n_kv_heads={kv} must divide n_heads={self.n_heads}",
        )
        _check(self.window > 0, "model.attention.window must be positive")


@dataclass
class MambaConfig:
    """Mamba (selective SSM), parameterised as mamba_ssm's ``Mamba`` module."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto": ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        _check(
            self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
            f"model.mamba.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}",
        )
        _check(0 < self.dt_min <= self.dt_max, "model.mamba needs 0 < dt_min <= dt_max")


@dataclass
class Mamba2Config:
    """Mamba2 (SSD), parameterised as mamba_ssm's ``Mamba2`` module."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    chunk_size: int = 256

    def __post_init__(self) -> None:
        self.A_init_range = tuple(self.A_init_range)  # type: ignore[assignment]
        _check(0 < self.A_init_range[0] <= self.A_init_range[1], "model.mamba2.A_init_range must be 0 < lo <= hi")
        _check(0 < self.dt_min <= self.dt_max, "model.mamba2 needs 0 < dt_min <= dt_max")
        _check(self.chunk_size > 0, "model.mamba2.chunk_size must be positive")


@dataclass
class DeltaNetConfig:
    """DeltaNet: q/k/v projections, short convs, L2-normalised q/k, beta gate, delta rule."""

    n_heads: int = 4
    head_dim: int = 64  # key (and query) head dim; value head dim = head_dim * expand_v
    expand_v: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    use_output_gate: bool = False
    chunk_size: int = 64

    def __post_init__(self) -> None:
        _check(self.n_heads > 0 and self.head_dim > 0, "model.deltanet: n_heads and head_dim must be positive")
        _check(
            float(self.head_dim * self.expand_v).is_integer(),
            "model.deltanet: head_dim * expand_v must be an integer",
        )


@dataclass
class GatedDeltaNetConfig:
    """Gated DeltaNet: DeltaNet plus a decay gate g = -exp(A_log) * softplus(W_a x + dt_bias)
    and an output gate. Value heads are ``expand_v`` times the key head dim (2 in the paper)."""

    n_heads: int = 4
    head_dim: int = 64
    expand_v: float = 2.0
    conv_size: int = 4
    use_short_conv: bool = True
    A_init_range: tuple[float, float] = (0.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 64

    def __post_init__(self) -> None:
        self.A_init_range = tuple(self.A_init_range)  # type: ignore[assignment]
        _check(self.n_heads > 0 and self.head_dim > 0, "model.gated_deltanet: n_heads and head_dim must be positive")
        _check(
            float(self.head_dim * self.expand_v).is_integer(),
            "model.gated_deltanet: head_dim * expand_v must be an integer",
        )


@dataclass
class ModelConfig:
    """A language model: embedding → blocks (mixer [+ SwiGLU MLP]) tiled from ``pattern`` → norm → head.

    ``d_intermediate``: hidden size of each block's SwiGLU MLP; 0 makes mixer-only blocks (as
    mamba_ssm's pure Mamba stacks); None picks the Llama-style size, 8/3 · d_model rounded up to a
    multiple of 256.
    """

    name: str = "custom"
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    pattern: str = "G"
    d_intermediate: int | None = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    backend: str = "auto"  # op backend for every mixer: auto | reference | chunked | triton
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    deltanet: DeltaNetConfig = field(default_factory=DeltaNetConfig)
    gated_deltanet: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)

    def __post_init__(self) -> None:
        _check(self.vocab_size > 0, "model.vocab_size must be positive")
        _check(self.d_model > 0, "model.d_model must be positive")
        _check(self.n_layers > 0, "model.n_layers must be positive")
        _check(len(self.pattern) > 0, "model.pattern must name at least one mixer")
        bad = sorted(set(self.pattern) - set(MIXER_LETTERS))
        _check(
            not bad,
            f"model.pattern={self.pattern!r} has unknown letter(s) {bad}; "
            f"allowed: {', '.join(f'{k}={v}' for k, v in MIXER_LETTERS.items())}",
        )
        _check(self.backend in OP_BACKENDS, f"model.backend={self.backend!r}; allowed: {', '.join(OP_BACKENDS)}")
        _check(self.d_intermediate is None or self.d_intermediate >= 0, "model.d_intermediate must be >= 0")

    @property
    def layer_types(self) -> list[str]:
        """The mixer letter of every layer: the pattern tiled to ``n_layers``."""
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size (0 = no MLP)."""
        if self.d_intermediate is not None:
            return self.d_intermediate
        return 256 * math.ceil(8 * self.d_model / 3 / 256)
