"""Checkpoints of the whole training state, written atomically, verified on load, never unpickled.

Layout (``<run_dir>/checkpoints/step_00000020/``)::

    model.safetensors      # parameters and persistent buffers (a tied weight stored once)
    optimizer.safetensors  # optimizer state tensors, keys "state.<param index>.<name>"
    rng.safetensors        # torch CPU / CUDA generator states, numpy's key array
    train_state.json       # step, loader position, schedule, counters, optimizer param groups,
                           # python / numpy RNG scalars, the resolved config, and for every file
                           # above its size and CRC32; written last

A checkpoint is written into ``.tmp-step_...`` and renamed to ``step_...`` only when complete, so a
directory named ``step_*`` is either whole or damaged afterwards. Loading first verifies every
file's size and CRC32; :func:`find_resume` reports a corrupt or partial checkpoint and falls back
to the next newest. Tensors are read with safetensors and everything else is JSON: no pickle.

Distributed runs: ``train_state.json`` names its ``format``. This module implements
``"safetensors-v1"`` (one process holds the full state). A ``torch.distributed.checkpoint`` format
for DDP / FSDP slots in as a second pair of ``_save_tensors`` / ``_load_tensors`` functions that
writes a ``dcp/`` folder instead of the ``*.safetensors`` files; the atomic rename, verification,
rotation and ``train_state.json`` stay as they are.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "checkpoint_dir_name",
    "find_resume",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state_dict",
    "model_state_dict",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINT_FORMAT = "safetensors-v1"
STATE_FILE = "train_state.json"
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message says which file and why."""


def checkpoint_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


# ------------------------------------------------------------------ model state


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with aliases (tied weights) stored once, contiguous, on the CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`model_state_dict` output; keys left out must be aliases of loaded ones."""
    aliases = _alias_map(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise CheckpointError("model weights do not match the model: " + " ".join(lines[1:3]) + more) from None
    real_missing = [k for k in missing if aliases.get(k) not in state]
    if real_missing or unexpected:
        raise CheckpointError(
            f"model weights do not match the model: missing {real_missing[:8]}, unexpected {list(unexpected)[:8]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _alias_map(model: nn.Module) -> dict[str, str]:
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = first.setdefault(key, name)
    return out


# ------------------------------------------------------------------ RNG


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    scalars = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, scalars


def _set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = scalars["numpy"]
    np.random.set_state((n[0], tensors["numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    p = scalars["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------ optimizer state


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------ files


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _save_tensors(d: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The single-process tensor writer (``safetensors-v1``); returns the JSON side of the state."""
    save_file(model_state_dict(model), str(d / "model.safetensors"))
    meta: dict[str, Any] = {}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(d / "optimizer.safetensors"))
    rng_tensors, meta["rng"] = _rng_state()
    save_file(rng_tensors, str(d / "rng.safetensors"))
    return meta


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` atomically; keep the newest ``keep_last``.

    ``state``: JSON-serialisable extras (loader position, schedule, counters, config).
    Returns the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _save_tensors(tmp, model, optimizer)
        files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        doc = {"format": CHECKPOINT_FORMAT, "step": step, "files": files, **meta, **state, "complete": True}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # an older write of the same step (e.g. a rerun): replace it
            old = root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir() if d.is_dir() else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories (``step_*``) under ``root``, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX) :]))


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The parsed ``train_state.json`` of a complete, intact checkpoint; raises :class:`CheckpointError`."""
    d = Path(path)
    sf = d / STATE_FILE
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a checkpoint directory")
    if not sf.is_file():
        raise CheckpointError(f"{d} has no {STATE_FILE} (partial write)")
    try:
        doc = json.loads(sf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sf} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not doc.get("complete"):
        raise CheckpointError(f"{sf} does not mark the checkpoint complete")
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{d} has format {doc.get('format')!r}; this version reads {CHECKPOINT_FORMAT!r}")
    for name, info in doc.get("files", {}).items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{p} has {p.stat().st_size} bytes, expected {info['bytes']} (truncated?)")
        if _crc32(p) != info["crc32"]:
            raise CheckpointError(f"{p} fails its CRC32 check (corrupt)")
    return doc


def find_resume(root: str | Path, log=print) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint under ``root`` and its state; damaged ones are reported and skipped."""
    root = Path(root)
    for tmp in sorted(root.glob(".tmp-*")) if root.is_dir() else []:
        log(f"skipping partial checkpoint {tmp} (an interrupted write)")
    for d in reversed(list_checkpoints(root)):
        try:
            return d, verify_checkpoint(d)
        except CheckpointError as e:
            log(f"skipping corrupt checkpoint {d}: {e}")
    return None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    doc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a verified checkpoint into ``model`` (and ``optimizer``); returns ``train_state.json``."""
    d = Path(path)
    doc = doc if doc is not None else verify_checkpoint(d)
    device = next(model.parameters()).device
    load_model_state_dict(model, load_file(str(d / "model.safetensors"), device=str(device)))
    if optimizer is not None:
        if "optimizer" not in doc:
            raise CheckpointError(f"{d} holds no optimizer state")
        tensors = load_file(str(d / "optimizer.safetensors"))
        sd = _unflatten_optimizer(tensors, doc["optimizer"])
        n_saved = [len(g["params"]) for g in sd["param_groups"]]
        n_now = [len(g["params"]) for g in optimizer.param_groups]
        if n_saved != n_now:
            raise CheckpointError(f"{d}: optimizer groups hold {n_saved} parameters, this model's {n_now}")
        optimizer.load_state_dict(sd)
    if restore_rng:
        _set_rng_state(load_file(str(d / "rng.safetensors")), doc["rng"])
    return doc
