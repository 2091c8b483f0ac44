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

``compiled=True`` measures the block as the trainer's ``block.compile()`` runs it: Dynamo traces
the block on real CPU tensors (no kernel runs: Dynamo and AOT autograd trace with fake tensors),
inductor's joint-graph passes and min-cut partitioner split the joint graph, and the backward
graph's inputs (less the tangents) are what the compiled forward saves. Code generation is skipped.
Each saved tensor is attributed to the innermost ``mixlab`` line of its fx node's stack trace. Under
compile an ``autograd.Function``'s ``save_for_backward`` is not what is kept: its backward is traced
into the joint graph and the partitioner chooses the saved set anew.

``python -m mixlab.bench.activations [--compiled] [PRESET ...]`` prints the table (with
``--compiled``: eager and compiled side by side, by source line).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
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
    note: str = ""


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


def _stand_in(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
    """An inner compiler that generates no code: the compiled graph returns empty tensors of its
    outputs' shapes (so that Dynamo goes on past a graph break); no kernel runs."""
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    vals = [o.meta.get("val") if isinstance(o, torch.fx.Node) else o for o in outs]

    def run(args: list[Any]) -> list[Any]:
        args.clear()  # the boxed calling convention: the callee frees its inputs
        return [
            torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v for v in vals
        ]

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _compiled_saved(block: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> list[tuple[str, Any, int]]:
    """``(site, fake tensor, nbytes of its storage)`` for every distinct storage that the inductor-compiled
    forward of ``block(x)`` saves for backward: the backward graphs' non-tangent inputs, over every
    graph that Dynamo makes of the block (a graph break makes several). Parameters are left out."""
    import torch._inductor.compile_fx as cfx
    from torch.multiprocessing.reductions import StorageWeakRef

    graphs: list[tuple[Any, Any]] = []
    partition = cfx.min_cut_rematerialization_partition

    def record(joint: Any, inputs: Any, **kwargs: Any) -> Any:
        fw, bw = partition(joint, inputs, **kwargs)
        graphs.append((fw, bw))
        return fw, bw

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return cfx.compile_fx(gm, example_inputs, inner_compile=_stand_in)

    params = {(tuple(p.shape), p.dtype) for p in block.parameters()}
    torch._dynamo.reset()
    cfx.min_cut_rematerialization_partition = record  # type: ignore[assignment]
    try:
        fn = torch.compile(block, backend=backend, dynamic=False)
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            fn(x)
    finally:
        cfx.min_cut_rematerialization_partition = partition  # type: ignore[assignment]
        torch._dynamo.reset()
    if not graphs:
        raise RuntimeError("torch.compile made no forward/backward partition of the block")
    seen: dict[Any, tuple[str, Any, int]] = {}
    for fw, bw in graphs:
        fw_nodes = {n.name: n for n in fw.graph.nodes}
        for node in bw.graph.nodes:
            if node.op != "placeholder" or node.name.startswith("tangents"):
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue  # a saved SymInt / non-tensor
            src = fw_nodes.get(node.name)
            is_input = src is not None and src.op == "placeholder"
            if is_input and (tuple(val.shape), val.dtype) in params and not _same_meta(val, x):
                continue  # a parameter: held anyway
            ref = StorageWeakRef(val.untyped_storage())
            if ref not in seen:
                site = ("input x" if _same_meta(val, x) else "graph input") if is_input else _node_site(src)
                seen[ref] = (f"{site} [{node.name}]", val, val.untyped_storage().nbytes())
    return list(seen.values())


def _same_meta(val: Any, x: torch.Tensor) -> bool:
    return isinstance(val, torch.Tensor) and tuple(val.shape) == tuple(x.shape) and val.dtype == x.dtype


def _node_site(node: Any) -> str:
    """``file.py:line function`` of the innermost mixlab frame in an fx node's stack trace."""
    import re

    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', trace)
    for name, line, func in reversed(frames):
        if name.startswith(_PKG) and name != _SELF and "/ops/_backend" not in name:
            return f"{name[len(_PKG) + 1 :]}:{line} {func}"
    return f"? {node.target}" if node is not None else "?"


def measure_saved(
    build: Callable[[], torch.nn.Module],
    d_model: int,
    seq_lens: tuple[int, int] = (256, 512),
    batch: int = 1,
    amp: torch.dtype | None = torch.bfloat16,
    residual_dtype: torch.dtype = torch.float32,
    compiled: bool = False,
    triton: bool = True,
    name: str = "",
    letter: str = "",
) -> SavedReport:
    """Per-token bytes that ``build()`` (a module ``[B, T, d_model] -> [B, T, d_model]``) saves for
    backward, eager (fake tensors) or ``compiled`` (inductor's partition; real CPU parameters, nothing runs)."""
    runs = []
    ctx = _force_triton() if triton else contextlib.nullcontext()
    with ctx, contextlib.nullcontext() if compiled else _fake_mode():
        torch.manual_seed(0)
        block = build()
        for T in seq_lens:
            # compiled: nothing runs, and the partition is that of the training scale only at its sizes
            make = torch.empty if compiled else torch.randn
            x = make(batch, T, d_model).to(residual_dtype).requires_grad_()
            runs.append(_compiled_saved(block, x, amp) if compiled else _saved(block, x, amp))
    (t1, s1), (t2, s2) = zip(seq_lens, runs)
    n1, n2 = batch * t1, batch * t2
    tot1, tot2 = sum(b for *_, b in s1), sum(b for *_, b in s2)
    per_token = (tot2 - tot1) / (n2 - n1)
    report = SavedReport(name, letter, per_token, tot1 - per_token * n1)
    if compiled and sorted(_node_of(site) for site, *_ in s1) != sorted(_node_of(site) for site, *_ in s2):
        # the partitioner chose differently at the two lengths: the difference is not a per-token cost
        report.note = f"partition differs between T={t1} and T={t2}"
    key = _site_key if compiled else (lambda site: site)
    sites1: dict[str, int] = {}
    for site, _, b in s1:
        sites1[key(site)] = sites1.get(key(site), 0) + b
    sites2: dict[str, int] = {}
    for site, t, b in s2:
        sites2[key(site)] = sites2.get(key(site), 0) + b
        report.tensors.append((site, "x".join(map(str, t.shape)), str(t.dtype).replace("torch.", ""), b / n2))
    for site in sites2:
        per = (sites2[site] - sites1.get(site, 0)) / (n2 - n1)
        if per:
            report.by_site[site] = per
    report.by_site = dict(sorted(report.by_site.items(), key=lambda kv: -kv[1]))
    return report


def _node_of(site: str) -> str:
    return site.rsplit(" [", 1)[-1]


def _site_key(site: str) -> str:
    """A compiled site without its fx node name (node numbering differs between the two lengths)."""
    return site.rsplit(" [", 1)[0]


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)  # tables cached by real runs (RoPE) may be read


COMPILED_SEQ_LENS = (20480, 28672)  # near the 32K tokens of a 1.3b step; one RoPE table size (32K) for both


def block_saved_bytes(
    preset: str,
    letter: str | None = None,
    seq_lens: tuple[int, int] = (256, 512),
    batch: int = 1,
    triton: bool = True,
    amp: torch.dtype | None = torch.bfloat16,
    residual_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> SavedReport:
    """Bytes per token that one block of ``preset`` (pattern letter ``letter``, default the first)
    saves for backward, measured at two sequence lengths; the block's input is the residual
    stream in ``residual_dtype`` (default: what ``LanguageModel`` feeds its blocks). ``compiled``:
    as ``torch.compile`` (inductor) partitions it: the min-cut weighs token-sized tensors against
    parameter-sized ones, so measure near the training step's tokens (:data:`COMPILED_SEQ_LENS`)."""
    from ..layers import Block, build_mixer
    from ..models import get_preset

    cfg = get_preset(preset)
    letter = letter or cfg.layer_types[0]
    if residual_dtype is None:
        residual_dtype = Block.residual_dtype(torch.float32)

    def build() -> torch.nn.Module:
        return Block(cfg.d_model, build_mixer(letter, cfg, 0), cfg.mlp_hidden, cfg.norm_eps)

    if compiled and seq_lens == (256, 512):
        seq_lens = COMPILED_SEQ_LENS
    return measure_saved(
        build, cfg.d_model, seq_lens, batch, amp, residual_dtype, compiled, triton, name=preset, letter=letter
    )


def preset_letters(preset: str) -> list[str]:
    """The distinct pattern letters of ``preset`` (one block of each is measured)."""
    from ..models import get_preset

    return list(dict.fromkeys(get_preset(preset).layer_types))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=None)
    parser.add_argument("--plain", action="store_true", help="plain PyTorch backends instead of the Triton ops")
    parser.add_argument("--compiled", action="store_true", help="also as torch.compile (inductor) partitions the block")
    parser.add_argument("--top", type=int, default=12, help="sites listed per block")
    args = parser.parse_args(argv)
    presets = args.presets or ["transformer-1.3b", "gated_deltanet-1.3b", "mamba2-1.3b", "gdn_h1-1.3b", "mamba-1.3b"]
    for preset in presets:
        for letter in preset_letters(preset):
            r = block_saved_bytes(preset, letter, triton=not args.plain)
            if not args.compiled:
                print(f"{preset} [{letter}]: {r.total / 1024:.1f} KiB/token/block (fixed {r.fixed / 2**20:.1f} MiB)")
                for site, b in list(r.by_site.items())[: args.top]:
                    print(f"  {b / 1024:8.2f} KiB  {site}")
                continue
            c = block_saved_bytes(preset, letter, triton=not args.plain, compiled=True)
            print(
                f"{preset} [{letter}]: eager {r.total / 1024:.1f}  compiled {c.total / 1024:.1f} "
                f"KiB/token/block ({(c.total - r.total) / 1024:+.1f}) {c.note}"
            )
            print(f"  {'eager':>8} {'compiled':>8}  KiB/token  site")
            sites = list(dict.fromkeys([*c.by_site, *r.by_site]))
            sites.sort(key=lambda s: -max(c.by_site.get(s, 0), r.by_site.get(s, 0)))
            for site in sites[: args.top] if args.top else sites:
                e, k = r.by_site.get(site, 0) / 1024, c.by_site.get(site, 0) / 1024
                mark = "  <" if abs(k - e) > 0.05 else ""
                print(f"  {e:8.2f} {k:8.2f}  {site}{mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
