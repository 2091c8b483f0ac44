"""Checkpoints of the whole training state: one path for one process, DDP and FSDP; written
atomically, verified on load, resharded on resume, never unpickled.

Layout (``<run_dir>/checkpoints/step_00000020/``), format ``dcp-v1``::

    model.safetensors      # parameters and persistent buffers (a tied weight stored once)
    optimizer.safetensors  # optimizer state tensors, keys "<param name>.<state name>" (exp_avg, step, ...)
    rng.safetensors        # torch CPU / this rank's CUDA generator, numpy's key array (+ python/numpy
                           # scalars in the file's metadata)
    train_state.json       # format, step, loader position, schedule, counters, optimizer param groups,
                           # the resolved config, and for every file above its size and CRC32; written last

With ``W > 1`` ranks every rank writes its own ``model-rankRRRRR-of-WWWWW.safetensors``,
``optimizer-rank...`` and ``rng-rank...`` files instead (``rng.safetensors`` for rank 0).

The model and optimizer tensors go through ``torch.distributed.checkpoint`` (DCP):
``get_state_dict`` / ``set_state_dict`` give the same parameter names for a plain, DDP or FSDP
model, and DCP's planner splits the work: under FSDP each rank writes its shards, replicated
tensors are written once. Each file is plain safetensors whose metadata (``mixlab_dcp``, JSON)
records, for every tensor, its name, its offset in the full tensor and the full size; loading
reads those headers to rebuild DCP's metadata, so a checkpoint saved on N ranks loads on M ranks
(any strategy, any world size) by reading exactly the slices each rank needs. Everything that is
not a tensor is JSON. Nothing is unpickled.

Atomicity: the checkpoint is written into ``.tmp-step_...`` (rank 0 creates it; every rank writes
its files there and reports their CRC32s), then rank 0 writes ``train_state.json`` and renames
the directory to ``step_...``; only then do the ranks continue. A directory named ``step_*`` is
whole or damaged afterwards, never partial; :func:`find_resume` reports damaged ones and falls
back to the next newest.

The previous single-process format ``safetensors-v1`` (optimizer keys ``state.<index>.<name>``)
still loads (one process or DDP); the next save writes ``dcp-v1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
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
    "read_model_state",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINT_FORMAT = "dcp-v1"
LEGACY_FORMAT = "safetensors-v1"
READABLE_FORMATS = (CHECKPOINT_FORMAT, LEGACY_FORMAT)
STATE_FILE = "train_state.json"
_PREFIX = "step_"
_META_KEY = "mixlab_dcp"
#: optimizer param-group keys that describe this process's implementation, not the training state
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt, or does not fit the model; the message says which and why."""


def checkpoint_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


# ------------------------------------------------------------------ process group


def _world(group: Any = None) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather(obj: Any, group: Any) -> list[Any]:
    import torch.distributed as dist

    if _world(group)[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _broadcast(obj: Any, group: Any) -> Any:
    import torch.distributed as dist

    if _world(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _file_name(stem: str, rank: int, world: int) -> str:
    if world == 1:
        return f"{stem}.safetensors"
    if stem == "rng" and rank == 0:
        return "rng.safetensors"
    return f"{stem}-rank{rank:05d}-of-{world:05d}.safetensors"


def _stem_files(d: Path, stem: str) -> list[Path]:
    pat = re.compile(rf"^{stem}(-rank\d+-of-\d+)?\.safetensors$")
    return sorted(p for p in d.iterdir() if pat.match(p.name))


# ------------------------------------------------------------------ model state (whole, one process)


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
    from mixlab.train.parallel import tied_aliases

    aliases = tied_aliases(model)
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


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model state of a checkpoint directory (any format, any number of ranks) as CPU
    tensors, tied weights stored once; :func:`load_model_state_dict` loads it."""
    d = Path(path)
    files = _stem_files(d, "model")
    if not files:
        raise CheckpointError(f"{d} holds no model*.safetensors")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = _file_meta(h, f)
            for key in list(h.keys()):  # a safetensors handle, not a dict
                info = meta.get(key)
                t = h.get_tensor(key)
                if info is None:  # a plain (safetensors-v1) file
                    out[key] = t
                    continue
                fqn, offsets, size = info["fqn"], info["offsets"], info["size"]
                if list(t.shape) == list(size):
                    out[fqn] = t
                    continue
                full = out.get(fqn)
                if full is None:
                    full = out[fqn] = torch.empty(size, dtype=t.dtype)
                full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return out


def _file_meta(h: Any, f: Path) -> dict[str, Any]:
    raw = (h.metadata() or {}).get(_META_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: its {_META_KEY} header is not valid JSON ({e})") from None


# ------------------------------------------------------------------ DCP storage: safetensors files, JSON metadata


def _dcp():
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import metadata as md
        from torch.distributed.checkpoint import planner as pl
        from torch.distributed.checkpoint import storage as st
    except ImportError as e:  # pragma: no cover - torch built without distributed
        raise CheckpointError(f"checkpoints need torch.distributed.checkpoint, which failed to import: {e}") from None
    return dcp, md, pl, st


def _make_writer(path: Path, stem: str, rank: int, world: int):
    _, _md, pl, st = _dcp()
    from torch.futures import Future

    class SafetensorsWriter(st.StorageWriter):
        """Each rank writes the items DCP's planner gives it into one safetensors file."""

        def __init__(self) -> None:
            super().__init__()
            self.file: Path | None = None

        def reset(self, checkpoint_id: Any = None) -> None:
            pass

        def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
            pass

        def prepare_local_plan(self, plan: Any) -> Any:
            return plan

        def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
            return plans

        def write_data(self, plan: Any, planner: Any) -> Any:
            tensors: dict[str, torch.Tensor] = {}
            meta: dict[str, Any] = {}
            results = []
            ptrs: set[int] = set()
            name = _file_name(stem, rank, world)
            for item in plan.items:
                if item.type == pl.WriteItemType.BYTE_IO:
                    raise CheckpointError(
                        f"checkpoint item {item.index.fqn!r} is not a tensor; non-tensor state belongs in {STATE_FILE}"
                    )
                t = planner.resolve_data(item).detach().to("cpu").contiguous()
                if t.numel() and t.untyped_storage().data_ptr() in ptrs:
                    t = t.clone()  # safetensors refuses tensors that share memory
                if t.numel():
                    ptrs.add(t.untyped_storage().data_ptr())
                fqn = item.index.fqn
                offsets = list(item.tensor_data.chunk.offsets)
                key = fqn if fqn not in tensors else f"{fqn}@{','.join(map(str, offsets))}"
                tensors[key] = t
                meta[key] = {
                    "fqn": fqn,
                    "offsets": offsets,
                    "size": list(item.tensor_data.size),
                    "dtype": str(t.dtype).removeprefix("torch."),
                }
                results.append(
                    st.WriteResult(
                        index=item.index, size_in_bytes=t.numel() * t.element_size(), storage_data=(name, key)
                    )
                )
            if tensors:
                self.file = path / name
                save_file(tensors, str(self.file), metadata={_META_KEY: json.dumps(meta), "format": "pt"})
            fut: Future = Future()
            fut.set_result(results)
            return fut

        def finish(self, metadata: Any, results: Any) -> None:
            pass  # every file describes itself; train_state.json is written by save_checkpoint

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return False

        def storage_meta(self) -> Any:
            return None

    return SafetensorsWriter()


def _read_metadata(path: Path, stem: str) -> Any:
    """DCP ``Metadata`` rebuilt from the ``mixlab_dcp`` headers of the ``stem`` files under ``path``."""
    _, md, _, _ = _dcp()
    sd_md: dict[str, Any] = {}
    storage: dict[Any, tuple[str, str]] = {}
    for f in _stem_files(path, stem):
        with safe_open(str(f), framework="pt") as h:
            meta = _file_meta(h, f)
            for key in list(h.keys()):  # a safetensors handle, not a dict
                info = meta.get(key)
                if info is None:
                    raise CheckpointError(f"{f}: tensor {key!r} has no {_META_KEY} entry (not a dcp-v1 file)")
                shape = list(h.get_slice(key).get_shape())
                dtype = getattr(torch, info["dtype"])
                fqn, offsets = info["fqn"], torch.Size(info["offsets"])
                entry = sd_md.get(fqn)
                if entry is None:
                    entry = sd_md[fqn] = md.TensorStorageMetadata(
                        properties=md.TensorProperties(dtype=dtype), size=torch.Size(info["size"]), chunks=[]
                    )
                entry.chunks.append(md.ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(shape)))
                storage[md.MetadataIndex(fqn, offsets)] = (f.name, key)
    return md.Metadata(state_dict_metadata=sd_md, storage_data=storage)


def _make_reader(path: Path, stem: str):
    _, _md, _, st = _dcp()
    from torch.futures import Future

    class SafetensorsReader(st.StorageReader):
        """Reads the slices each rank needs out of the ``stem`` files written by the writer above."""

        def __init__(self) -> None:
            super().__init__()
            self.storage: dict[Any, tuple[str, str]] = {}

        def reset(self, checkpoint_id: Any = None) -> None:
            pass

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return _read_metadata(path, stem)

        def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
            self.storage = metadata.storage_data

        def prepare_local_plan(self, plan: Any) -> Any:
            return plan

        def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
            return plans

        def read_data(self, plan: Any, planner: Any) -> Any:
            per_file: dict[str, list[Any]] = {}
            for req in plan.items:
                per_file.setdefault(self.storage[req.storage_index][0], []).append(req)
            for name, reqs in per_file.items():
                with safe_open(str(path / name), framework="pt") as h:
                    for req in reqs:
                        key = self.storage[req.storage_index][1]
                        if len(req.lengths) == 0:
                            src = h.get_tensor(key)
                        else:
                            idx = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))
                            src = h.get_slice(key)[idx]
                        target = planner.resolve_tensor(req).detach()
                        if target.shape != src.shape:
                            raise CheckpointError(
                                f"{path / name}: {key} slice has shape {list(src.shape)}, expected {list(target.shape)}"
                            )
                        target.copy_(src)
                        planner.commit_tensor(req, target)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return False

    return SafetensorsReader()


@contextlib.contextmanager
def _quiet_single_process():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def _dcp_save(state: dict[str, torch.Tensor], d: Path, stem: str, group: Any) -> Path | None:
    dcp = _dcp()[0]
    rank, world = _world(group)
    writer = _make_writer(d, stem, rank, world)
    with _quiet_single_process():
        dcp.save(state, storage_writer=writer, process_group=group, no_dist=world == 1)
    return writer.file


def _check_keys(what: str, d: Path, stem: str, expected: dict[str, torch.Tensor]) -> None:
    """Fail with a readable error when the checkpoint's tensors and the model's differ."""
    metadata = _read_metadata(d, stem).state_dict_metadata
    missing = sorted(set(expected) - set(metadata))
    unexpected = sorted(set(metadata) - set(expected))
    shapes = [
        f"{k}: checkpoint {list(metadata[k].size)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in metadata and tuple(metadata[k].size) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(
                "shape mismatch "
                + "; ".join(shapes[:4])
                + (f" (and {len(shapes) - 4} more)" if len(shapes) > 4 else "")
            )
        if missing:
            parts.append(f"missing {missing[:8]}" + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(
                f"unexpected {unexpected[:8]}" + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
            )
        raise CheckpointError(f"{what} do not match the model: " + "; ".join(parts))


def _dcp_load(state: dict[str, Any], d: Path, stem: str, group: Any) -> None:
    dcp = _dcp()[0]
    world = _world(group)[1]
    with _quiet_single_process():
        dcp.load(state, storage_reader=_make_reader(d, stem), process_group=group, no_dist=world == 1)


# ------------------------------------------------------------------ RNG


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()  # this process's device only
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
    if torch.cuda.is_available():
        if "cuda" in tensors:
            torch.cuda.set_rng_state(tensors["cuda"])
        else:  # safetensors-v1: every device's state
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
            if cuda and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    n = scalars["numpy"]
    np.random.set_state((n[0], tensors["numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    p = scalars["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------ optimizer param groups (JSON side)


def _groups_to_json(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k not in _IMPL_KEYS})
    return out


def _groups_from_json(saved: list[dict[str, Any]], optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    groups = []
    for g, now in zip(saved, optimizer.param_groups):
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        for k in _IMPL_KEYS:  # keep this process's implementation choices (fused on CUDA, foreach on the CPU)
            if k in now:
                g[k] = now[k]
        groups.append(g)
    return groups


# ------------------------------------------------------------------ files


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(paths: Iterable[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _save_tensors(
    d: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, group: Any = None
) -> tuple[dict[str, Any], list[Path]]:
    """Write this rank's model / optimizer / RNG files into ``d`` (a collective with several ranks).

    Returns the JSON side of the state (optimizer param groups) and the files this rank wrote."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from mixlab.train.parallel import tied_aliases

    rank, world = _world(group)
    aliases = tied_aliases(model)
    written: list[Path] = []
    msd = {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}
    written.append(_dcp_save(msd, d, "model", group))
    meta: dict[str, Any] = {}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        written.append(_dcp_save(osd["state"], d, "optimizer", group))
        meta["optimizer"] = {"param_groups": _groups_to_json(osd["param_groups"])}
    rng_tensors, rng_scalars = _rng_state()
    rng_file = d / _file_name("rng", rank, world)
    save_file(rng_tensors, str(rng_file), metadata={"rng": json.dumps(rng_scalars), "format": "pt"})
    written.append(rng_file)
    return meta, [p for p in written if p is not None]


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 0,
    process_group: Any = None,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` atomically; keep the newest ``keep_last``.

    ``model``: the bare model (plain, or sharded in place by FSDP); ``state``: JSON-serialisable
    extras (loader position, schedule, counters, config). With a process group every rank calls
    this (``process_group``: the group to coordinate on, default the global one); rank 0 writes
    ``train_state.json`` and renames. Returns the checkpoint directory.
    """
    root = Path(root)
    rank, world = _world(process_group)
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{final.name}-{_broadcast(os.getpid(), process_group)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if world > 1:
        _gather(None, process_group)  # a barrier: the directory exists
    error: BaseException | None = None
    meta: dict[str, Any] = {}
    mine: dict[str, Any] = {}
    try:
        meta, files = _save_tensors(tmp, model, optimizer, process_group)
        _fsync(files)
        mine = {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in files}
    except BaseException as e:
        error = e
    reports = _gather((None if error is None else f"{type(error).__name__}: {error}", mine), process_group)
    failed = [(r, msg) for r, (msg, _) in enumerate(reports) if msg is not None]
    if not failed and rank == 0:
        try:
            files_doc = {k: v for _, m in reports for k, v in sorted(m.items())}
            doc = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "world_size": world,
                "files": dict(sorted(files_doc.items())),
                **meta,
                **state,
                "complete": True,
            }
            (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
            _fsync([tmp / STATE_FILE])
            if final.exists():  # an older write of the same step (e.g. a rerun): replace it
                old = root / f".old-{final.name}-{os.getpid()}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        except BaseException as e:
            error = e
            failed = [(0, f"{type(e).__name__}: {e}")]
    if world > 1:
        failed = _broadcast(failed, process_group)
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"writing {final} failed on rank {failed[0][0]}: {failed[0][1]}")
    if rank == 0 and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


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
    if doc.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{d} has format {doc.get('format')!r}; this version reads {', '.join(map(repr, READABLE_FORMATS))}"
        )
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
    process_group: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``), whatever the number of ranks that wrote it;
    returns ``train_state.json``. With a process group every rank calls this with the same ``doc``
    (already verified, e.g. by rank 0); without ``doc`` the checkpoint is verified here first.

    The RNG state is restored from this rank's file when the checkpoint has one."""
    d = Path(path)
    doc = doc if doc is not None else verify_checkpoint(d)
    if doc.get("format") == LEGACY_FORMAT:
        _load_legacy(d, doc, model, optimizer)
    else:
        _load_dcp(d, doc, model, optimizer, process_group)
    if restore_rng:
        rank = _world(process_group)[0]
        saved_world = int(doc.get("world_size", 1))
        f = d / _file_name("rng", rank, saved_world)
        if rank < saved_world and f.is_file():
            with safe_open(str(f), framework="pt") as h:
                raw = (h.metadata() or {}).get("rng")
            scalars = json.loads(raw) if raw is not None else doc["rng"]
            _set_rng_state(load_file(str(f)), scalars)
    return doc


def _load_dcp(
    d: Path, doc: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None, group: Any
) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from mixlab.train.parallel import tied_aliases

    aliases = tied_aliases(model)
    msd = {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}
    _check_keys("model weights", d, "model", msd)
    _dcp_load(msd, d, "model", group)
    for alias, owner in aliases.items():
        if owner in msd:
            msd[alias] = msd[owner]
    set_model_state_dict(model, msd)
    if hasattr(model, "tie_weights") and not any(hasattr(p, "device_mesh") for p in model.parameters()):
        model.tie_weights()
    if optimizer is None:
        return
    if "optimizer" not in doc or not _stem_files(d, "optimizer"):
        raise CheckpointError(f"{d} holds no optimizer state")
    osd = get_optimizer_state_dict(model, optimizer)
    state = osd["state"]
    flat = {f"{fqn}.{k}": v for fqn, st in state.items() for k, v in st.items() if isinstance(v, torch.Tensor)}
    _check_keys("optimizer state tensors", d, "optimizer", flat)
    _dcp_load(state, d, "optimizer", group)
    groups = _groups_from_json(doc["optimizer"]["param_groups"], optimizer)
    saved = [list(g["params"]) for g in groups]
    now = [list(g["params"]) for g in osd["param_groups"]]
    if saved != now:
        raise CheckpointError(
            f"{d}: the optimizer's parameter groups {[len(s) for s in saved]} differ from this model's {[len(n) for n in now]}"
        )
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


def _load_legacy(d: Path, doc: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """``safetensors-v1``: whole tensors, optimizer state keyed by parameter index."""
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        raise CheckpointError(
            f"{d} is in the single-process format {LEGACY_FORMAT!r}, which loads into an unsharded model only; "
            "resume it once with parallel.strategy=none or ddp (the next checkpoint is written in the "
            f"{CHECKPOINT_FORMAT!r} format), then switch to fsdp"
        )
    device = next(model.parameters()).device
    load_model_state_dict(model, load_file(str(d / "model.safetensors"), device=str(device)))
    if optimizer is None:
        return
    if "optimizer" not in doc:
        raise CheckpointError(f"{d} holds no optimizer state")
    tensors = load_file(str(d / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for idx, sc in doc["optimizer"].get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = _groups_from_json(doc["optimizer"]["param_groups"], optimizer)
    n_saved = [len(g["params"]) for g in groups]
    n_now = [len(g["params"]) for g in optimizer.param_groups]
    if n_saved != n_now:
        raise CheckpointError(f"{d}: optimizer groups hold {n_saved} parameters, this model's {n_now}")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
