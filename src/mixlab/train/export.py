"""Export a trained model as ``config.json`` + ``model.safetensors`` (+ its tokenizer), and load it back.

``config.json`` is the :class:`~mixlab.config.ModelConfig` as JSON (its fields only), so
``load_model(dir)`` rebuilds the architecture; ``mixlab_tokenizer.json`` (and the tokenizer file, if
any) names the tokenizer the model was trained with (``mixlab.data.load_tokenizer_from_dir``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixlab.config import ModelConfig

__all__ = ["export", "load_model", "model_config_from_dict"]


def export(
    model: nn.Module | None,
    model_config: ModelConfig,
    out_dir: str | Path,
    tokenizer: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (one file, tied weights stored
    once) and, when ``tokenizer`` (a ``data.tokenizer`` spec) is given, the tokenizer. Returns ``out_dir``.

    ``state``: the whole model state to write instead of ``model``'s (a sharded model's, gathered
    by :func:`mixlab.train.parallel.full_model_state` on rank 0)."""
    from mixlab.data.tokenizer import save_tokenizer_to_dir
    from mixlab.train.checkpoint import model_state_dict

    if state is None:
        if model is None:
            raise ValueError("export needs a model or its state")
        state = model_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "mixlab"})
    tmp.replace(out / "model.safetensors")
    cfg = json.dumps(_plain(dataclasses.asdict(model_config)), indent=2) + "\n"
    (out / "config.json").write_text(cfg)
    if tokenizer is not None:
        save_tokenizer_to_dir(tokenizer, out)
    return out


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from ``config.json`` contents (strict: unknown keys fail)."""
    from mixlab.configio import config_from_dict

    return config_from_dict({"model": data}).model


def load_model(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, ModelConfig]:
    """The model of an export directory (a finished run directory is one): ``(model, config)``.

    A run directory without an export (a stopped run) falls back to its newest intact checkpoint.
    """
    from mixlab.models import build_model
    from mixlab.train.checkpoint import find_resume, load_model_state_dict, read_model_state

    d = Path(path)
    cfg_file = d / "config.json"
    weights = d / "model.safetensors"
    if not weights.is_file():
        found = find_resume(d / "checkpoints", log=lambda _m: None)
        if found is None:
            raise FileNotFoundError(f"{d} holds no model.safetensors and no intact checkpoint under checkpoints/")
        state = read_model_state(found[0])  # a checkpoint of any number of ranks
        cfg = model_config_from_dict(found[1]["config"]["model"])
    else:
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{d} holds model.safetensors but no config.json")
        cfg = model_config_from_dict(json.loads(cfg_file.read_text()))
        state = load_file(str(weights))
    model = build_model(cfg, device=device, dtype=dtype)
    target = next(model.parameters()).device
    state = {k: v.to(target) for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_model_state_dict(model, state)
    return model, cfg


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
