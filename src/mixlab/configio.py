"""Load the config tree from YAML and Hydra-style ``key=value`` overrides; dump it back.

    cfg = load_config("configs/train/default.yaml", ["model=mamba2-125m", "train.lr=3e-4"])
    text = dump_config(cfg)           # YAML; load_config_text(text) == cfg

Rules (the same for YAML files and overrides):

- Keys are dotted paths into the dataclass tree (``train.lr``, ``model.attention.n_heads``).
  An unknown key fails at once, naming it and the nearest valid key (difflib).
- Values are parsed as YAML scalars or flow lists (``3e-4``, ``true``, ``null``, ``[0.9,0.95]``)
  and checked against the field's annotation; a wrong type fails naming the key, the expected
  type and the value. ``int`` widens to ``float``; strings that spell a number are accepted for
  numeric fields (YAML 1.1 reads ``3e-4`` as a string).
- ``model=<preset>`` (or ``model: <preset>`` in YAML) starts the model from a preset of
  ``mixlab.models.presets``; later ``model.<field>=...`` overrides apply on top of it, whatever
  their order on the command line. With no model given, the preset is ``gated_deltanet-tiny``.
- ``~key`` resets a key to its default.

Why not OmegaConf/Hydra: the tree is plain dataclasses with ``__post_init__`` validation and a few
union types (``int | str``, ``str | list[str]``) that OmegaConf's structured configs reject; the
whole job (strict keys, typed values, suggestions, preset selection) is ~200 lines here, and
Hydra's per-run output directories and global state are not wanted (the run directory is ours).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from mixlab.config import Config, ConfigError, ModelConfig

DEFAULT_MODEL_PRESET = "gated_deltanet-tiny"

__all__ = [
    "DEFAULT_MODEL_PRESET",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_config_text",
    "parse_override",
    "save_config",
]


# ------------------------------------------------------------------ public API


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved :class:`Config` of a YAML file (optional) plus ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(loaded).__name__}")
        data = loaded or {}
    return _resolve(data, list(overrides))


def load_config_text(text: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Like :func:`load_config` from YAML text."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("config YAML must hold a mapping at the top")
    return _resolve(data, list(overrides))


def config_from_dict(data: dict[str, Any]) -> Config:
    """A :class:`Config` from a nested mapping (as YAML gives); strict about keys and types."""
    return _resolve(data, [])


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (tree) as plain dicts / lists / scalars (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Any) -> str:
    """YAML text of a config tree; :func:`load_config_text` of it rebuilds an equal tree."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write :func:`dump_config` to ``path`` atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(p)
    return p


def parse_override(text: str) -> tuple[str, Any, bool]:
    """``"a.b=1e-3"`` -> ``("a.b", 0.001, False)``; ``"~a.b"`` -> ``("a.b", None, True)`` (reset)."""
    text = text.strip()
    if text.startswith("~"):
        key = text[1:].split("=", 1)[0].strip()
        if not key:
            raise ConfigError(f"override {text!r}: '~' must be followed by a key")
        return key, None, True
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key, _parse_value(raw), False


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A new :class:`Config`: ``cfg`` with ``key=value`` overrides applied (validated again)."""
    return _resolve(config_to_dict(cfg), list(overrides), default_preset=None)


# ------------------------------------------------------------------ resolution


def _resolve(data: dict[str, Any], overrides: list[str], default_preset: str | None = DEFAULT_MODEL_PRESET) -> Config:
    data = dict(data)
    parsed = [parse_override(o) for o in overrides]
    # 1. the model's base: a preset named by `model=...` (last one wins), else YAML's, else the default.
    model_data = data.pop("model", None)
    preset = None
    for key, value, reset in parsed:
        if key == "model":
            if reset:
                model_data, preset = None, None
            elif isinstance(value, str):
                model_data, preset = None, value
            else:
                raise ConfigError(f"override model={value!r}: expected a preset name such as {DEFAULT_MODEL_PRESET!r}")
    if preset is None and isinstance(model_data, str):
        preset, model_data = model_data, None
    if isinstance(model_data, dict) and "preset" in model_data:
        model_data = dict(model_data)
        preset = model_data.pop("preset")
    if preset is None and model_data is None and default_preset is not None:
        preset = default_preset
    if model_data is not None and not isinstance(model_data, dict):
        raise ConfigError(f"config key 'model' expects a preset name or a mapping, got {model_data!r}")
    tree = _plain(dataclasses.asdict(Config()))
    tree["model"] = _plain(dataclasses.asdict(_preset(preset))) if preset is not None else tree["model"]
    # 2. the YAML mapping on top (strict: every key must exist in the tree).
    _merge(tree, {"model": model_data or {}, **data}, prefix="", cls=Config)
    # 3. the overrides, in order.
    for key, value, reset in parsed:
        if key == "model":
            continue
        _set(tree, key, value, reset)
    return _build(Config, tree, prefix="")


def _preset(name: str) -> ModelConfig:
    try:
        from mixlab.models.presets import get_preset
    except ImportError as e:
        raise ConfigError(f"model={name!r} needs mixlab.models.presets, which failed to import: {e}") from None
    try:
        return get_preset(name)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model={name!r}: {e.args[0] if e.args else 'unknown preset'}") from None


def _merge(tree: dict[str, Any], data: dict[str, Any], prefix: str, cls: type) -> None:
    """Write ``data`` into ``tree`` (a plain-dict image of dataclass ``cls``), checking keys."""
    hints = _hints(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key_message(full, cls, prefix))
        sub = _dataclass_of(hints[key])
        if sub is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a section; expected a mapping, got {value!r}")
            _merge(tree[key], value, prefix=f"{full}.", cls=sub)
        else:
            tree[key] = value


def _set(tree: dict[str, Any], key: str, value: Any, reset: bool) -> None:
    parts = key.split(".")
    node, cls, prefix = tree, Config, ""
    for i, part in enumerate(parts):
        hints = _hints(cls)
        full = prefix + part
        if part not in hints:
            where = "" if i == len(parts) - 1 else f" (in override key {key!r})"
            raise ConfigError(_unknown_key_message(full, cls, prefix) + where)
        sub = _dataclass_of(hints[part])
        last = i == len(parts) - 1
        if last:
            if reset:
                default = _plain(dataclasses.asdict(cls()))[part]
                node[part] = default
            elif sub is not None:
                if not isinstance(value, dict):
                    raise ConfigError(f"config key {full!r} is a section; set its fields, e.g. {full}.<field>=...")
                _merge(node[part], value, prefix=f"{full}.", cls=sub)
            else:
                node[part] = value
            return
        if sub is None:
            raise ConfigError(f"config key {full!r} is a value, not a section; {key!r} does not exist")
        node, cls, prefix = node[part], sub, f"{full}."


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(_unknown_key_message(prefix + name, cls, prefix))
        tp = hints[name]
        sub = _dataclass_of(tp)
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'!r}: {e}") from None


# ------------------------------------------------------------------ types


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    return str(tp)


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    try:
        return _coerce_inner(value, tp)
    except _Mismatch:
        raise ConfigError(
            f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def _coerce_inner(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        # exact matches first (so `int | str` keeps 16 an int and "auto" a string), then coercions
        for a in args:
            if _exact(value, a):
                return _coerce_inner(value, a)
        for a in args:
            try:
                return _coerce_inner(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce_inner(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce_inner(v, item) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def _exact(value: Any, tp: Any) -> bool:
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float, str):
        return isinstance(value, tp) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    return origin in (list, tuple) and isinstance(value, (list, tuple))


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ messages


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        sub = _dataclass_of(tp)
        keys.append(prefix + name)
        if sub is not None:
            keys.extend(_all_keys(sub, f"{prefix}{name}."))
    return keys


def _unknown_key_message(full: str, cls: type, prefix: str) -> str:
    local = [prefix + k for k in _hints(cls)]
    near = difflib.get_close_matches(full, local, n=1, cutoff=0.5)
    if not near:
        near = difflib.get_close_matches(full, _all_keys(Config), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    where = prefix.rstrip(".") or "the root"
    valid = ", ".join(sorted(_hints(cls)))
    return f"unknown config key {full!r}{hint} (valid keys of {where}: {valid})"
