"""mixlab: language models on attention, Mamba, Mamba2, DeltaNet and Gated DeltaNet mixers.

Quick tour::

    import mixlab
    cfg = mixlab.get_preset("gated_deltanet-tiny")     # a ModelConfig (mixlab.list_presets() names them all)
    model = mixlab.build_model(cfg)                     # meta-device build, materialised and initialised
    logits = model(input_ids)                           # [B, T] -> [B, T, vocab]
    cache = model.init_cache(batch_size, max_len)       # decode: model(next_ids, cache=cache)
    out = model.generate(input_ids, max_new_tokens=50)  # sampling over the decode cache
    model = mixlab.from_pretrained("path/to/dir")       # mixlab / mamba_ssm / Hugging Face / fla checkpoints

The ops (``delta_rule``, ``ssd``, ``selective_scan``, ``causal_conv1d``, ``attention``) are plain
functions on ``[B, T, H, D]`` tensors with ``reference`` / ``chunked`` / ``triton`` backends.
"""

from .config import (
    AttentionConfig,
    ConfigError,
    DeltaNetConfig,
    GatedDeltaNetConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
)
from .models import LanguageModel, ModelCache, build_model, get_preset, list_presets
from .models.hub import from_pretrained, save_pretrained
from .ops import causal_conv1d, delta_rule, selective_scan, ssd
from .ops.attention import apply_rope, attention

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DeltaNetConfig",
    "GatedDeltaNetConfig",
    "LanguageModel",
    "Mamba2Config",
    "MambaConfig",
    "ModelCache",
    "ModelConfig",
    "__version__",
    "apply_rope",
    "attention",
    "build_model",
    "causal_conv1d",
    "delta_rule",
    "from_pretrained",
    "get_preset",
    "list_presets",
    "save_pretrained",
    "selective_scan",
    "ssd",
]
