"""Sequence-mixer layers and the registry that builds them from a :class:`~mixlab.config.ModelConfig`.

Pattern letter -> class (constructor kwargs = the fields of the letter's sub-config):
``A`` Attention (full causal), ``S`` Attention with ``window``, ``m`` Mamba, ``M`` Mamba2,
``D`` DeltaNet, ``G`` GatedDeltaNet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import MIXER_LETTERS, ModelConfig
from .attention import Attention, AttentionCache
from .base import Mixer
from .block import Block
from .deltanet import DeltaNet, GatedDeltaNet
from .mamba import Mamba
from .mamba2 import Mamba2
from .mlp import SwiGLU
from .norm import GatedRMSNorm, RMSNorm

#: pattern letter -> (Mixer class, ModelConfig field holding its sub-config)
MIXER_REGISTRY: dict[str, tuple[type[Mixer], str]] = {
    "A": (Attention, "attention"),
    "S": (Attention, "attention"),
    "m": (Mamba, "mamba"),
    "M": (Mamba2, "mamba2"),
    "D": (DeltaNet, "deltanet"),
    "G": (GatedDeltaNet, "gated_deltanet"),
}


def mixer_class(letter: str) -> type[Mixer]:
    """The Mixer class of a pattern letter."""
    if letter not in MIXER_REGISTRY:
        allowed = ", ".join(f"{k}={v}" for k, v in MIXER_LETTERS.items())
        raise ValueError(f"unknown mixer letter {letter!r}; allowed: {allowed}")
    return MIXER_REGISTRY[letter][0]


def mixer_kwargs(letter: str, cfg: ModelConfig) -> dict[str, Any]:
    """Constructor kwargs of the mixer of ``letter`` (its sub-config's fields) as ``cfg`` sets them."""
    mixer_class(letter)  # validates the letter
    kwargs = dataclasses.asdict(getattr(cfg, MIXER_REGISTRY[letter][1]))
    if letter == "A":
        kwargs["window"] = None  # full causal attention; the window applies to ``S`` layers only
    return kwargs


def build_mixer(letter: str, cfg: ModelConfig, layer_idx: int | None = None, device=None, dtype=None) -> Mixer:
    """Build the mixer of pattern letter ``letter`` for layer ``layer_idx`` of the model ``cfg``."""
    cls = mixer_class(letter)
    return cls(
        cfg.d_model,
        **mixer_kwargs(letter, cfg),
        layer_idx=layer_idx,
        backend=cfg.backend,
        norm_eps=cfg.norm_eps,
        device=device,
        dtype=dtype,
    )


__all__ = [
    "MIXER_REGISTRY",
    "Attention",
    "AttentionCache",
    "Block",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedRMSNorm",
    "Mamba",
    "Mamba2",
    "Mixer",
    "RMSNorm",
    "SwiGLU",
    "build_mixer",
    "mixer_class",
    "mixer_kwargs",
]
