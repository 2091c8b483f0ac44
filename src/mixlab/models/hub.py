"""Load models from local checkpoint directories of any supported format; save them back.

``from_pretrained(path)`` reads a LOCAL directory (nothing is downloaded: fetch checkpoints yourself,
e.g. ``huggingface-cli download state-spaces/mamba-130m --local-dir mamba-130m``) and detects its
format from ``config.json``:

==================  ===========================================================  ======================
format              recognised by                                                weights
==================  ===========================================================  ======================
mixlab              ModelConfig fields (``pattern``, ``n_layers``); a run dir    model.safetensors
mamba_ssm           ``d_model`` + ``n_layer`` (``MambaLMHeadModel``)              pytorch_model.bin
hf_mamba(2)         ``model_type: mamba`` / ``mamba2``                           *.safetensors / .bin
fla_gated_deltanet  ``model_type: gated_deltanet``                               *.safetensors / .bin
fla_deltanet        ``model_type: delta_net``                                    *.safetensors / .bin
==================  ===========================================================  ======================

Sharded weights (``*.index.json``) are read too; ``.bin`` files are unpickled with
``weights_only=True``. A tokenizer in the directory (``mixlab_tokenizer.json``, ``tokenizer.json``,
``tokenizer.model``, ``*.tiktoken``) is what ``mixlab generate`` uses: :func:`load_tokenizer_for`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from .convert import (
    FORMATS,
    UnsupportedCheckpointError,
    from_fla,
    from_hf_mamba,
    from_mamba_ssm,
    load_converted_state,
    to_hf_mamba,
    to_mamba_ssm,
)

__all__ = [
    "EXPORT_FORMATS",
    "detect_format",
    "from_pretrained",
    "load_checkpoint",
    "load_tokenizer_for",
    "read_weights",
    "save_pretrained",
]

EXPORT_FORMATS = ("mixlab", "mamba_ssm", "hf")
#: files a tokenizer may consist of (copied along on conversion)
TOKENIZER_FILES = (
    "mixlab_tokenizer.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_MODEL_TYPES = {
    "mamba": "hf_mamba",
    "mamba2": "hf_mamba2",
    "gated_deltanet": "fla_gated_deltanet",
    "delta_net": "fla_deltanet",
}


def _read_config(d: Path) -> dict[str, Any]:
    f = d / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{d} holds no config.json; expected a model directory ({', '.join(FORMATS)})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f} must hold a JSON object")
    return cfg


def detect_format(path: str | Path) -> str:
    """The checkpoint format of directory ``path``: one of :data:`~mixlab.models.convert.FORMATS`."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{str(d)!r} is not a directory; from_pretrained loads a local model directory")
    if not (d / "config.json").is_file() and (d / "config.yaml").is_file():
        return "mixlab"  # a run directory without an export yet: its checkpoints
    cfg = _read_config(d)
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if "pattern" in cfg and "n_layers" in cfg:
        return "mixlab"
    if "d_model" in cfg and "n_layer" in cfg:
        return "mamba_ssm"
    known = ", ".join(f"{k!r}" for k in _MODEL_TYPES)
    raise UnsupportedCheckpointError(
        f"{d / 'config.json'}: unknown checkpoint format (model_type={model_type!r}); mixlab reads its own exports, "
        f"mamba_ssm MambaLMHeadModel configs (d_model, n_layer) and model_type {known}"
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory on the CPU: ``*.safetensors`` (preferred) or ``*.bin``,
    sharded (with an ``*.index.json``) or not."""
    d = Path(path)
    for index_name, loader in (("model.safetensors.index.json", _load_st), ("pytorch_model.bin.index.json", _load_bin)):
        index = d / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for name in files:
                out.update(loader(d / name))
            return out
    st = sorted(d.glob("*.safetensors"))
    if st:
        out = {}
        for f in st:
            out.update(_load_st(f))
        return out
    bins = sorted(p for p in d.glob("*.bin") if p.name != "training_args.bin")
    if bins:
        out = {}
        for f in bins:
            out.update(_load_bin(f))
        return out
    raise FileNotFoundError(f"{d} holds no *.safetensors or *.bin weights")


def _load_st(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(f), device="cpu")


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal names the offending global
        raise ValueError(f"{f}: cannot load it as plain tensors (weights_only=True): {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{f} does not hold a state dict (got {type(state).__name__})")
    return state


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str], str]:
    """``(config, state in mixlab names, origin: mixlab key -> source key, format)`` of a directory."""
    d = Path(path)
    fmt = detect_format(d)
    if fmt == "mixlab":
        from ..configio import config_from_dict

        if not (d / "model.safetensors").is_file():
            return _load_run_checkpoint(d)
        config = config_from_dict({"model": _read_config(d)}).model
        state = read_weights(d)
        return config, state, {}, fmt
    cfg, state = _read_config(d), read_weights(d)
    if fmt == "mamba_ssm":
        config, out, origin = from_mamba_ssm(cfg, state)
    elif fmt in ("hf_mamba", "hf_mamba2"):
        config, out, origin = from_hf_mamba(cfg, state)
    else:
        config, out, origin = from_fla(cfg, state)
    return config, out, origin, fmt


def _load_run_checkpoint(d: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str], str]:
    # A run directory that has no export yet (a stopped run): its newest intact checkpoint.
    from ..configio import config_from_dict
    from ..train.checkpoint import find_resume, read_model_state

    found = find_resume(d / "checkpoints", log=lambda _m: None)
    if found is None:
        raise FileNotFoundError(f"{d} holds no model.safetensors and no intact checkpoint under checkpoints/")
    config = config_from_dict({"model": found[1]["config"]["model"]}).model
    return config, read_model_state(found[0]), {}, "mixlab"


def from_pretrained(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> nn.Module:
    """A :class:`~mixlab.models.LanguageModel` from a local directory in any supported format.

    ``dtype``: parameter dtype (default float32); ``backend``: override the op backend
    (``reference`` / ``chunked`` / ``triton``). Raises :class:`~mixlab.models.convert.
    UnsupportedCheckpointError` for settings mixlab cannot represent and
    :class:`~mixlab.models.convert.CheckpointMismatchError` listing every tensor that does not fit.
    """
    from ..config import OP_BACKENDS
    from .lm import build_model

    if backend is not None and backend not in OP_BACKENDS:
        raise ValueError(f"from_pretrained: backend={backend!r}; allowed: {', '.join(OP_BACKENDS)}")
    config, state, origin, fmt = load_checkpoint(path)
    if backend is not None:
        config.backend = backend
    model = build_model(config, device=device, dtype=dtype or torch.float32)
    load_converted_state(model, state, origin, source=f"{fmt} checkpoint {str(path)!r}")
    model.eval()
    return model


def save_pretrained(
    model: nn.Module, path: str | Path, format: str = "mixlab", tokenizer_from: str | Path | None = None
) -> Path:
    """Write ``model`` to directory ``path`` as ``mixlab`` (config.json + model.safetensors),
    ``mamba_ssm`` (config.json + pytorch_model.bin) or ``hf`` (Hugging Face Mamba/Mamba2:
    config.json + model.safetensors). ``tokenizer_from``: a directory whose tokenizer files are copied."""
    from safetensors.torch import save_file

    if format not in EXPORT_FORMATS:
        raise ValueError(f"save_pretrained: format={format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if format == "mixlab":
        import dataclasses

        from ..configio import config_to_dict

        cfg = config_to_dict(model.config) if dataclasses.is_dataclass(model.config) else dict(model.config)
        state = _unique_contiguous(model.state_dict())
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "producer": "mixlab"})
    elif format == "mamba_ssm":
        cfg, state = to_mamba_ssm(model)
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "pytorch_model.bin"))
    else:
        cfg, state = to_hf_mamba(model)
        save_file(_unique_contiguous(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out)
    return out


def _unique_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors on the CPU, contiguous, tied ones stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of directory ``src`` into ``dst``; the names copied."""
    s, d = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (s / n).is_file()] + [p.name for p in sorted(s.glob("*.tiktoken"))]
    for n in names:
        if (s / n).resolve() != (d / n).resolve():
            shutil.copyfile(s / n, d / n)
    return names


def load_tokenizer_for(path: str | Path) -> Any | None:
    """The tokenizer that belongs to a model or run directory, or None when it names none.

    Looks for ``mixlab_tokenizer.json`` / a tokenizer file in the directory (:func:`mixlab.data.
    tokenizer.load_tokenizer_from_dir`), then a run's ``config.yaml`` (its ``data.tokenizer``).
    """
    from ..data.tokenizer import TOKENIZER_SPEC_FILE, load_tokenizer, load_tokenizer_from_dir

    d = Path(path)
    has_file = (
        (d / TOKENIZER_SPEC_FILE).is_file()
        or any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
        or any(d.glob("*.tiktoken"))
    )
    if has_file:
        return load_tokenizer_from_dir(d)
    if (d / "config.yaml").is_file():
        import yaml

        spec = ((yaml.safe_load((d / "config.yaml").read_text()) or {}).get("data") or {}).get("tokenizer", "byte")
        return load_tokenizer(spec)
    return None
