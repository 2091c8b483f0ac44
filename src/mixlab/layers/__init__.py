"""Sequence-mixer layers and the registry that builds them from a :class:`~mixlab.config.ModelConfig`.

Pattern letter -> class (constructor kwargs = the fields of the letter's sub-config):
``A`` Attention (full causal), ``S`` Attention with ``window``, ``m`` Mamba, ``M`` Mamba2,
``D`` DeltaNet, ``G`` GatedDeltaNet.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..config import MIXER_LETTERS, ModelConfig
from .attention import Attention, AttentionCache
from .base import Mixer
from .block import Block
from .mlp import SwiGLU
from .norm import GatedRMSNorm, RMSNorm

#: pattern letter -> (module in this package, class name, ModelConfig field holding its sub-config)
MIXER_REGISTRY: dict[str, tuple[str, str, str]] = {
    "A": ("attention", "Attention", "attention"),
    "S": ("attention", "Attention", "attention"),
    "m": ("mamba", "Mamba", "mamba"),
    "M": ("mamba2", "Mamba2", "mamba2"),
    "D": ("deltanet", "DeltaNet", "deltanet"),
    "G": ("deltanet", "GatedDeltaNet", "gated_deltanet"),
}
_LAZY = {"Mamba": "mamba", "Mamba2": "mamba2", "DeltaNet": "deltanet", "GatedDeltaNet": "deltanet"}


def mixer_class(letter: str) -> type[Mixer]:
    """The Mixer class of a pattern letter."""
    if letter not in MIXER_REGISTRY:
        allowed = ", ".join(f"{k}={v}" for k, v in MIXER_LETTERS.items())
        raise ValueError(f"unknown mixer letter {letter!r}; allowed: {allowed}")
    module, name, _ = MIXER_REGISTRY[letter]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def mixer_kwargs(letter: str, cfg: ModelConfig) -> dict[str, Any]:
    """Constructor kwargs of the mixer of ``letter`` (its sub-config's fields) as ``cfg`` sets them."""
    kwargs = dataclasses.asdict(getattr(cfg, MIXER_REGISTRY[letter][2]))
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


def __getattr__(name: str) -> Any:
    # The recurrent mixers are imported on first use, so that importing mixlab stays light.
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
