"""Language models over the mixers, their presets and construction helpers."""

from .lm import LanguageModel, ModelCache, build_model
from .presets import get_preset, list_presets

__all__ = ["LanguageModel", "ModelCache", "build_model", "get_preset", "list_presets"]
