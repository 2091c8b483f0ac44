"""Activation memory: the bytes one block saves for backward, per token, as training runs it.

:func:`block_saved_bytes` builds one block of a preset (its widths, e.g. ``gated_deltanet-1.3b``)
under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` (no memory, no compute), runs its
forward under bf16 autocast with float32 parameters (the trainer's setting) and records every tensor
autograd saves (``saved_tensors_hooks``), deduplicated by storage. ``triton=True`` (default) routes
every op to its Triton custom op, whose fake implementation runs instead of the kernel, so the
counts are those of the CUDA path (``setup_context`` of each custom op), while the other ops run
on the CPU autocast lists (CUDA's differ only in ops that see float32 inputs here anyway).

Two sequence lengths are measured; the difference divided by the extra tokens is the per-token
cost (parameters, their bf16 autocast copies and other fixed-size tensors drop out). Each saved
tensor is attributed to the innermost ``mixlab`` source line that created the save.

``python -m mixlab.bench.activations [PRESET ...]`` prints the table.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_PKG = str(Path(__file__).resolve().parent.parent)  # .../src/mixlab
_SELF = str(Path(__file__).resolve())


@dataclass
class SavedReport:
    """Per-token bytes saved for backward by one block (``total``) and by source line (``by_site``)."""

    preset: str
    letter: str
    total: float
    fixed: float
    by_site: dict[str, float] = field(default_factory=dict)
    tensors: list[tuple[str, str, str, float]] = field(default_factory=list)  # site, shape, dtype, bytes/token


def _site() -> str:
    """``file.py:line function`` of the innermost mixlab frame outside this module."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_PKG) and name != _SELF and "/ops/_backend" not in name:
            rel = name[len(_PKG) + 1 :]
            return f"{rel}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


@contextlib.contextmanager
def _force_triton() -> Iterator[None]:
    """Make ``backend="auto"`` resolve to ``triton`` on CPU tensors (the fake ops stand in for the kernels)."""
    from ..ops import _backend

    original = _backend.resolve_backend

    def resolve(backend: str, x: torch.Tensor) -> str:
        return "triton" if backend in ("auto", "triton") else original(backend, x)

    patched = []
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("mixlab.") and getattr(mod, "resolve_backend", None) is original:
            patched.append(mod)
            mod.resolve_backend = resolve  # type: ignore[attr-defined]
    # No TRITON_INTERPRET here: a Triton first imported under it builds its standard library as
    # interpreted functions, and every later GPU compile in this process fails (seen on the H100).
    try:
        yield
    finally:
        for mod in patched:
            mod.resolve_backend = original  # type: ignore[attr-defined]


def _saved(block: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> list[tuple[str, Any, int]]:
    """``(site, tensor, nbytes of its storage)`` for every distinct storage saved by ``block(x)``."""
    from torch.multiprocessing.reductions import StorageWeakRef

    seen: dict[Any, tuple[str, Any, int]] = {}
    params = {StorageWeakRef(p.untyped_storage()) for p in block.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in seen and ref not in params:
            seen[ref] = (_site(), t, t.untyped_storage().nbytes())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        block(x)
    return list(seen.values())


def block_saved_bytes(
    preset: str,
    letter: str | None = None,
    seq_lens: tuple[int, int] = (256, 512),
    batch: int = 1,
    triton: bool = True,
    amp: torch.dtype | None = torch.bfloat16,
    residual_dtype: torch.dtype | None = None,
) -> SavedReport:
    """Bytes per token that one block of ``preset`` (pattern letter ``letter``, default the first)
    saves for backward, measured at two sequence lengths; the block's input is the residual
    stream in ``residual_dtype`` (default: what ``LanguageModel`` feeds its blocks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..layers import Block, build_mixer
    from ..models import get_preset

    cfg = get_preset(preset)
    letter = letter or cfg.layer_types[0]
    if residual_dtype is None:
        residual_dtype = Block.residual_dtype(torch.float32)
    runs = []
    ctx = _force_triton() if triton else contextlib.nullcontext()
    with ctx, FakeTensorMode():
        torch.manual_seed(0)
        block = Block(cfg.d_model, build_mixer(letter, cfg, 0), cfg.mlp_hidden, cfg.norm_eps)
        for T in seq_lens:
            x = torch.randn(batch, T, cfg.d_model).to(residual_dtype).requires_grad_()
            runs.append(_saved(block, x, amp))
    (t1, s1), (t2, s2) = zip(seq_lens, runs)
    n1, n2 = batch * t1, batch * t2
    tot1, tot2 = sum(b for *_, b in s1), sum(b for *_, b in s2)
    per_token = (tot2 - tot1) / (n2 - n1)
    report = SavedReport(preset, letter, per_token, tot1 - per_token * n1)
    sites1: dict[str, int] = {}
    for site, _, b in s1:
        sites1[site] = sites1.get(site, 0) + b
    sites2: dict[str, int] = {}
    for site, t, b in s2:
        sites2[site] = sites2.get(site, 0) + b
        report.tensors.append((site, "x".join(map(str, t.shape)), str(t.dtype).replace("torch.", ""), b / n2))
    for site in sites2:
        per = (sites2[site] - sites1.get(site, 0)) / (n2 - n1)
        if per:
            report.by_site[site] = per
    report.by_site = dict(sorted(report.by_site.items(), key=lambda kv: -kv[1]))
    return report


def preset_letters(preset: str) -> list[str]:
    """The distinct pattern letters of ``preset`` (one block of each is measured)."""
    from ..models import get_preset

    return list(dict.fromkeys(get_preset(preset).layer_types))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=None)
    parser.add_argument("--plain", action="store_true", help="plain PyTorch backends instead of the Triton ops")
    parser.add_argument("--top", type=int, default=12, help="sites listed per block")
    args = parser.parse_args(argv)
    presets = args.presets or ["transformer-1.3b", "gated_deltanet-1.3b", "mamba2-1.3b", "gdn_h1-1.3b", "mamba-1.3b"]
    for preset in presets:
        for letter in preset_letters(preset):
            r = block_saved_bytes(preset, letter, triton=not args.plain)
            print(f"{preset} [{letter}]: {r.total / 1024:.1f} KiB/token/block (fixed {r.fixed / 2**20:.1f} MiB)")
            for site, b in list(r.by_site.items())[: args.top]:
                print(f"  {b / 1024:8.2f} KiB  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
