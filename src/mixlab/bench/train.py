"""``mixlab bench train``: training throughput, MFU and peak memory of the model presets on one GPU.

For each preset and shape (sequence length x batch; default every architecture's 1.3b preset at
2K x 16, 4K x 8, 8K x 4 and 16K x 2: 32K tokens per step, the Gated DeltaNet paper's Figure 3),
the step that ``mixlab train`` runs is timed: the model as built by the training loop (float32
master weights, bf16 autocast on CUDA, optional per-block activation checkpointing and
``torch.compile``), forward and backward of the chunked-LM-head loss on random tokens, gradient
clipping and a fused AdamW step. ``--warmup`` untimed steps (compilation, autotuning) come first,
then ``--steps`` timed ones, each synchronised; the median step time gives tokens/s.

MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s of the device (989e12 on an H100 SXM),
with model FLOPs per token (forward + backward) =
``6 x (non-embedding parameters + vocab x d_model)`` (every matmul weight, the LM head included)
``+ 6 x T_eff x heads x head_dim`` per attention layer (QK^T and AV, causal-halved; T_eff is the
sequence length, or the window of sliding-window layers). The linear-time mixers' state updates
(chunkwise scans) are not counted, so their MFU is a slight underestimate; the formula is
``mixlab.train.metrics.flops_per_token`` and is stored with the results.

Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (parameters, gradients,
AdamW state and activations). A point that runs out of memory is recorded as ``oom`` and skipped
(``--oom-retry-ac full`` retries it once with activation checkpointing; ``--ac auto``, the default, tries the
least recompute first and checkpoints more blocks until one fits: see :func:`ac_ladder`); any other failure is
recorded with its error and the suite goes on (``--isolate`` runs every point in its own process, so
that even a crashed kernel cannot end the suite). ``--long`` adds the 1.3b
Gated DeltaNet and Transformer (of the presets' size) at 32K x 1, their peak memory side by side. The issue's targets
are checked at the end; the table is printed last; JSON and a PNG plot (tokens/s against sequence
length per architecture, and peak memory) go to ``benchmarks/results/`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import cuda_sync, environment, format_table, free_memory, is_oom, pyplot, save_results

DEFAULT_PRESETS = (
    "transformer-1.3b",
    "mamba-1.3b",
    "mamba2-1.3b",
    "deltanet-1.3b",
    "gated_deltanet-1.3b",
    "gdn_h1-1.3b",
    "gdn_h2-1.3b",
)
DEFAULT_SHAPES = "2048x16,4096x8,8192x4,16384x2"
LONG_ARCHS = ("gated_deltanet", "transformer")
LONG_SHAPE = (32768, 1)
QUICK_PRESETS = ("transformer-tiny", "gated_deltanet-tiny")
QUICK_SHAPES = "64x4,128x2"
QUICK_LONG_SHAPE = (512, 1)
FLOPS_FORMULA = (
    "flops/token = 6*(non-embedding params + vocab*d_model) + sum over attention layers of 6*T_eff*heads*head_dim "
    "(causal-halved QK^T and AV, forward+backward; T_eff = seq_len or the sliding window); "
    "MFU = flops/token * tokens/s / device peak bf16 FLOP/s; linear mixers' scans not counted"
)
LINEAR = ("mamba", "mamba2", "deltanet", "gated_deltanet", "gdn_h1", "gdn_h2")
COLUMNS = [
    "preset", "seq_len", "batch", "status", "tokens_per_s", "mfu", "peak_mem_gb", "step_ms", "vs_transformer", "ac",
    "keep_states",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=None, help="comma-separated model presets (default: every 1.3b one)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated SEQxBATCH shapes (default {DEFAULT_SHAPES})")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per point (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; more with --compile)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block (as train.compile=true)")
    parser.add_argument(
        "--ac",
        default="auto",
        help="activation checkpointing per block: none | full | selective | selective:N (N blocks) | "
        "selective:F (a fraction) as train.activation_checkpointing, or auto (default): the least recompute "
        "that fits (none, then more and more blocks, then full; the first that does not run out of memory is timed)",
    )
    parser.add_argument(
        "--oom-retry-ac",
        default="none",
        help="retry a point that ran out of memory once with this activation checkpointing (default: no retry; "
        "--ac auto tries its own ladder instead)",
    )
    parser.add_argument(
        "--keep-states",
        default="auto",
        choices=("auto", "on", "off"),
        help="delta-rule layers keep their chunk states for backward (train.keep_states): auto (default) where no "
        "block is checkpointed and the memory estimate (keep_states_fit) has room, then without them if that runs "
        "out of memory",
    )
    parser.add_argument("--backend", default=None, help="op backend of every mixer (default: the preset's, auto)")
    parser.add_argument(
        "--long",
        action="store_true",
        help="also the Gated DeltaNet and Transformer of the presets' size at 32K x 1 (512 x 1 with --quick)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda:N")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s for MFU (default: by name)")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run every point in a fresh process (slower start-up; a crashing kernel cannot end the suite)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more step (torch.profiler): the device time by kernel class, the top "
        "kernels and (CUDA) the device time by launching op and input shapes go into the row (`profile`) and are "
        "printed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: tiny presets at {QUICK_SHAPES}, 1 warmup + 2 steps (explicit options still apply)",
    )


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2048x16,4kx8"`` -> ``[(2048, 16), (4096, 8)]`` (sequence length, batch; ``k`` = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            seq, batch = (int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in part.split("x"))
        except ValueError:
            raise ValueError(f"shape {part!r}: expected SEQxBATCH, e.g. 4096x8") from None
        if seq <= 0 or batch <= 0:
            raise ValueError(f"shape {part!r}: sequence length and batch must be positive")
        out.append((seq, batch))
    return out


def ac_ladder(preset: str, device: torch.device, tokens: int) -> list[str]:
    """The activation checkpointing modes ``--ac auto`` tries, least recompute first: ``none``, then
    ``selective:N`` with N growing by an eighth of the blocks, then ``full``. On CUDA the levels below
    the one that the measured saved bytes per token (:mod:`mixlab.bench.activations`) predict to be
    needed are skipped, less one level of margin."""
    from ..models import get_preset

    n = get_preset(preset).n_layers
    step = max(1, math.ceil(n / 8))
    ladder = ["none", *(f"selective:{k}" for k in range(step, n, step)), "full"]
    need = _blocks_needed(preset, device, tokens)
    if need is None:
        return ladder
    counts = [0, *range(step, n, step), n]
    first = max(0, max((i for i, c in enumerate(counts) if c <= need), default=0) - 1)
    return ladder[first:]


#: the device memory the estimates below may plan for (the rest: allocator rounding, CUDA context), and the bytes
#: they keep free on top of what they count (the loss's chunk, gradients in flight, fragmentation)
USABLE_MEMORY = 0.97
HEADROOM_BYTES = 4e9


def _estimate(
    fn: Callable[[str, int, float], Any], preset: str, device: torch.device, tokens: int, unknown: Any
) -> Any:
    """``fn(preset, tokens, device memory)`` on a CUDA device; ``unknown`` elsewhere or if the estimate fails."""
    if device.type != "cuda":
        return unknown
    try:
        return fn(preset, tokens, torch.cuda.get_device_properties(device).total_memory)
    except Exception:  # an estimate only
        return unknown


def _blocks_needed(preset: str, device: torch.device, tokens: int) -> int | None:
    """Blocks to checkpoint so that the activations predicted for ``tokens`` fit on ``device`` (None: unknown)."""
    return _estimate(blocks_needed, preset, device, tokens, None)


def blocks_needed(preset: str, tokens: int, memory: float) -> int:
    """Estimated number of blocks of ``preset`` to checkpoint for a step of ``tokens`` tokens to fit in
    ``memory`` bytes: 18 bytes per parameter (float32 weights, gradients, AdamW m and v, bf16 autocast
    copies), 4 GB of headroom (loss, gradients in flight, fragmentation), and per block the saved bytes
    per token that :func:`~mixlab.bench.activations.block_saved_bytes` measures; a checkpointed block
    keeps only its float32 input."""
    from ..models import get_preset
    from .activations import block_saved_bytes

    cfg = get_preset(preset)
    types = cfg.layer_types
    per = {ltr: block_saved_bytes(preset, ltr).total for ltr in set(types)}
    free = USABLE_MEMORY * memory - 18 * _param_count(cfg) - HEADROOM_BYTES
    costs = sorted((per[ltr] for ltr in types), reverse=True)  # the heaviest blocks' worth first
    keep = 4 * cfg.d_model
    act = sum(costs) * tokens
    for k, c in enumerate(costs):
        if act <= free:
            return k
        act -= (c - keep) * tokens
    return len(costs)


def keep_states_fit(preset: str, tokens: int, memory: float) -> bool:
    """Whether a step of ``tokens`` tokens of ``preset`` without activation checkpointing is estimated to fit in
    ``memory`` bytes with its delta-rule layers keeping their chunk states (``train.keep_states``). At the turn
    from forward to backward, where the activations peak, live are: 14 bytes per parameter (float32 weights,
    AdamW m and v, bf16 autocast copies; gradients are not allocated yet), the blocks' saved bytes per token
    (:func:`~mixlab.bench.activations.block_saved_bytes`), the kept states
    (:meth:`~mixlab.layers.deltanet.DeltaNet.kept_state_bytes_per_token`) and 4 GB of headroom, within 97% of
    ``memory`` (:func:`blocks_needed` counts the gradients too, a margin for its ladder; here a point that does
    not fit after all runs again without kept states). H100,
    GDN-H1 1.3b at 32,768 tokens: 79.9 GB estimated with the headroom, 77.9 GB measured peak. Only layers that
    keep them (``DeltaNet.keeping_states_pays``: K > 128) count; False when there are none."""
    from ..layers.deltanet import DeltaNet
    from ..models import get_preset
    from ..models.lm import LanguageModel
    from .activations import block_saved_bytes

    cfg = get_preset(preset)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    kept = sum(
        m.kept_state_bytes_per_token() for m in model.modules() if isinstance(m, DeltaNet) and m.keeping_states_pays()
    )
    if not kept:
        return False
    per = {ltr: block_saved_bytes(preset, ltr).total for ltr in set(cfg.layer_types)}
    act = sum(per[ltr] for ltr in cfg.layer_types) + kept
    return 14 * model.num_parameters() + act * tokens + HEADROOM_BYTES <= USABLE_MEMORY * memory


def _keep_states_fit(preset: str, device: torch.device, tokens: int) -> bool:
    return bool(_estimate(keep_states_fit, preset, device, tokens, False))


def _param_count(cfg: Any) -> int:
    from ..models.lm import LanguageModel

    with torch.device("meta"):
        return LanguageModel(cfg).num_parameters()


def _arch(preset: str) -> str:
    return preset.rsplit("-", 1)[0]


def bench_point(
    preset: str,
    seq_len: int,
    batch: int,
    device: torch.device,
    steps: int,
    warmup: int,
    ac: str = "none",
    compile_blocks: bool = False,
    backend: str | None = None,
    peak_flops: float | None = None,
    profile: bool = False,
    keep_states: bool = False,
) -> dict[str, Any]:
    """Time ``steps`` training steps of ``preset`` on ``[batch, seq_len]`` random tokens; one result row
    (with ``profile``, also where one step's device time goes: :func:`profile_step`). ``keep_states``: as
    ``train.keep_states``; the row's ``keep_states`` counts the layers that kept them."""
    from ..models import get_preset

    cfg = get_preset(preset)
    if backend:
        cfg.backend = backend
    row: dict[str, Any] = {
        "preset": preset,
        "arch": _arch(preset),
        "seq_len": seq_len,
        "batch": batch,
        "tokens_per_step": seq_len * batch,
        "compile": compile_blocks,
        "activation_checkpointing": ac,
        "ac": ac,  # short column name for the table
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "status": "ok",
    }
    if device.type == "cuda":
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    failure: str | None = None
    try:
        _measure(row, cfg, seq_len, batch, device, steps, warmup, ac, compile_blocks, peak_flops, profile, keep_states)
    except Exception as e:  # recorded, not raised: one point must not end the suite
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        failure = "oom" if is_oom(e) else f"{type(e).__name__}: {first}"
    # The model, optimizer state and activations lived in _measure's frame: freed with the exception.
    if failure is not None:
        row["status"] = "oom" if failure == "oom" else "error"
        if failure != "oom":
            row["error"] = failure
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if compile_blocks:
        torch._dynamo.reset()
    free_memory(device)
    return row


def _measure(
    row: dict[str, Any],
    cfg: Any,
    seq_len: int,
    batch: int,
    device: torch.device,
    steps: int,
    warmup: int,
    ac: str,
    compile_blocks: bool,
    peak_flops: float | None,
    profile: bool = False,
    keep_states: bool = False,
) -> None:
    from ..config import ParallelConfig, TrainConfig
    from ..models import build_model
    from ..train.metrics import flops_per_token
    from ..train.optim import build_optimizer
    from ..train.parallel import clip_for_fused_step, clip_grad_norm, parallelize

    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=torch.float32)
    row["params"] = model.num_parameters()
    row["params_non_embedding"] = model.num_parameters(exclude_embeddings=True)
    row["flops_per_token"] = flops_per_token(model, cfg, seq_len)
    par = parallelize(model, ParallelConfig(), device, amp, ac, compile_blocks, keep_states)
    row["keep_states"] = par.kept_states
    opt = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0))
    params = [p for g in opt.param_groups for p in g["params"]]
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:  # as the training loop's step: with a fused optimizer, no read-back before its step
        loss = par.runner(inputs, targets, all_scored=True)
        loss.backward()
        if clip_for_fused_step(params, 1.0, opt, loss.detach()) is None:
            clip_grad_norm(params, 1.0, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    cuda_sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        cuda_sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    row["step_ms"] = step_s * 1e3
    row["step_ms_all"] = [t * 1e3 for t in times]
    row["tokens_per_s"] = seq_len * batch / step_s
    row["loss"] = loss
    if not math.isfinite(loss):
        row["status"] = "nonfinite"
    if peak_flops:
        row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak_flops
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    if profile:
        row["profile"] = profile_step(step, device)


#: kernel classes of :func:`profile_step`, first match wins (lower-case substrings of the kernel name)
KERNEL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "splitk")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "_amp_foreach")),
    ("inductor", ("triton_",)),  # torch.compile's generated kernels
    ("collective", ("nccl",)),
)


def kernel_class(name: str) -> str:
    """The class of a device kernel (or, on CPU, an operator) by its name: :data:`KERNEL_CLASSES` or ``other``."""
    low = name.lower()
    if low.startswith("_") and low.endswith("_kernel"):  # the ops' Triton kernels are all named ``_..._kernel``
        return "mixlab triton"
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_step(step: Callable[[], float], device: torch.device, top: int = 25) -> dict[str, Any]:
    """Run ``step`` once under ``torch.profiler``: ``{"total_ms", "by_class": {class: ms}, "top": [[name, ms,
    calls]]}`` of self device time per kernel (CPU: self CPU time per operator, whose classes mean less); on CUDA
    also ``host_ms`` / ``host_top``, the host-side operators' self CPU time (a step whose time exceeds its kernels'
    is waiting for the host), and ``by_op``, the device time by launching operator and input shapes
    (:func:`ops_by_device_time`, from the step's Chrome trace)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities, record_shapes=cuda) as prof:
        step()
        cuda_sync(device)
    trace_dir = os.environ.get("MIXLAB_PROFILE_TRACE")  # a directory: also write the Chrome trace there
    by_op: list[list[Any]] = []
    if cuda or trace_dir:  # on CUDA the trace also gives the device time by launching op
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(trace_dir or tmp)
            out.mkdir(parents=True, exist_ok=True)
            trace = out / f"trace-{time.strftime('%H%M%S')}.json"
            prof.export_chrome_trace(str(trace))
            if cuda:
                by_op = ops_by_device_time(json.loads(trace.read_text()), top=top)
    kernels: dict[str, list[float]] = {}
    host: dict[str, list[float]] = {}  # CUDA runs: host-side operators by self CPU time (what keeps the GPU waiting)
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA and e.self_cpu_time_total > 0:
            host[e.key] = [e.self_cpu_time_total / 1e3, e.count]
        if _is_annotation(e.key, e):  # they span kernels counted on their own
            continue
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        else:
            us = float(e.self_cpu_time_total)
        if us > 0:
            k = kernels.setdefault(e.key, [0.0, 0])
            k[0] += us / 1e3
            k[1] += e.count
    gaps = _device_gaps(prof) if cuda else {}
    by_class: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "total_ms": sum(ms for ms, _ in kernels.values()),
        "by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
        "top": [[name[:160], ms, int(n)] for name, (ms, n) in ranked],
        "by_op": by_op,
        "host_ms": sum(ms for ms, _ in host.values()),
        "host_top": [[k[:160], ms, int(n)] for k, (ms, n) in sorted(host.items(), key=lambda kv: -kv[1][0])[:top]],
        "unit": "device ms (self time, one step)" if cuda else "CPU ms (self time per operator, one step)",
        **gaps,
    }


def ops_by_device_time(trace: dict[str, Any], top: int = 25) -> list[list[Any]]:
    """Device time by the operator that launched it, from a Chrome trace of ``torch.profiler`` (``record_shapes``
    for the shapes): ``[[op [input dims], ms, kernels], ...]``, the most first. Each kernel goes to the innermost
    host-side operator enclosing its launch (matched by correlation id), e.g. ``aten::mm[[32768, 2048], [2048, 6]]``
    or a custom op; kernels of one operator and shapes add up. A kernel-class total says what kind of work takes the
    time; this says which call, so that a small product that costs as much as a large one stands out."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ops: dict[Any, list[dict[str, Any]]] = {}  # per thread, by start time
    for e in events:
        if e.get("cat") == "cpu_op":
            ops.setdefault(e.get("tid"), []).append(e)
    starts = {}
    for tid, lst in ops.items():
        lst.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in lst]
    totals: dict[str, list[float]] = {}
    for k in events:
        if k.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        name = "(no launching op)"
        if launch is not None and launch.get("tid") in ops:
            # a thread's ops nest, so the innermost one around the launch is the latest-starting one that contains it
            lst, ts = ops[launch["tid"]], launch["ts"]
            i = bisect.bisect_right(starts[launch["tid"]], ts) - 1
            while i >= 0 and lst[i]["ts"] + lst[i]["dur"] < ts:
                i -= 1
            if i >= 0:
                op = lst[i]
                dims = op.get("args", {}).get("Input Dims")
                name = op["name"] + (str(dims).replace(" ", "") if dims else "")
        t = totals.setdefault(name[:200], [0.0, 0])
        t[0] += k.get("dur", 0.0) / 1e3
        t[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [[name, ms, int(n)] for name, (ms, n) in ranked]


def _is_annotation(name: str, event: Any = None) -> bool:
    """Whether a profiler event is a user annotation (a ``record_function`` range such as ``## Call CompiledFxGraph
    … ##`` or ``Optimizer.step#AdamW.step``), not a kernel or an operator. A ``#`` alone does not tell: kernels
    launched from lambdas carry one inside their signature (``…{lambda(int)#1}>(int, …)``)."""
    if getattr(event, "is_user_annotation", False):
        return True
    return "#" in name and "(" not in name


def _device_gaps(prof: Any, top: int = 12, min_us: float = 20.0) -> dict[str, Any]:
    """Where the device sat idle during the profiled step: ``span_ms`` (first kernel start to last kernel end),
    ``busy_ms`` (the union of kernel intervals), ``idle_ms`` (all idle time), ``idle_gaps_ms`` and ``gaps`` (the
    idle intervals of at least ``min_us``: their sum, the longest as [ms, kernel before, kernel after]). Long gaps
    are host-bound time (a sync, Python work before the next launch) that no kernel change can remove; the rest
    of ``idle_ms`` is the few microseconds between consecutive kernels, which grows with their number."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        # not the user annotations: they span kernels and the gaps between them
        if e.device_type == torch.autograd.DeviceType.CUDA
        and e.time_range.end > e.time_range.start
        and not _is_annotation(e.name, e)
    )
    if not spans:
        return {}
    busy, gap_list = 0.0, []
    cur_start, cur_end, cur_name = spans[0]
    for start, end, name in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            if start - cur_end >= min_us:
                gap_list.append([(start - cur_end) / 1e3, cur_name[:80], name[:80]])
            cur_start, cur_end, cur_name = start, end, name
        elif end > cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    span = max(e for _, e, _ in spans) - spans[0][0]
    gap_list.sort(key=lambda g: -g[0])
    return {
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (span - busy) / 1e3,
        "idle_gaps_ms": sum(g[0] for g in gap_list),
        "gaps": gap_list[:top],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_transformer``: tokens/s over the Transformer's at the same shape (when it ran)."""
    ref = {
        (r["seq_len"], r["batch"], r.get("size")): r["tokens_per_s"]
        for r in rows
        if r["arch"] == "transformer" and r["status"] == "ok"
    }
    for r in rows:
        base = ref.get((r["seq_len"], r["batch"], r.get("size")))
        if base and r["status"] == "ok":
            r["vs_transformer"] = r["tokens_per_s"] / base


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's throughput targets on one H100 (1.3b presets, bf16), for the points that ran."""
    ok = {(r["preset"], r["seq_len"], r["batch"]): r for r in rows if r["status"] == "ok"}
    out: list[dict[str, Any]] = []

    def tps(preset: str, seq: int, batch: int) -> float | None:
        r = ok.get((preset, seq, batch))
        return None if r is None else r["tokens_per_s"]

    def add(target: str, value: float | None, passed: bool) -> None:
        out.append({"target": target, "value": value, "pass": passed})

    for preset, seq, batch, floor in (
        ("gated_deltanet-1.3b", 4096, 8, 50e3),
        ("mamba2-1.3b", 4096, 8, 50e3),
        ("transformer-1.3b", 2048, 16, 55e3),
    ):
        v = tps(preset, seq, batch)
        if v is not None:
            add(f"{preset} >= {floor / 1e3:.0f}K tokens/s at {seq}x{batch}", v, v >= floor)
    h1 = [r for r in rows if r["preset"] == "gdn_h1-1.3b" and r["batch"] * r["seq_len"] == 32768]
    if h1:
        low = min((r["tokens_per_s"] for r in h1 if r["status"] == "ok"), default=0.0)
        add("gdn_h1-1.3b >= 55K tokens/s at every length", low, low >= 55e3 and all(r["status"] == "ok" for r in h1))
    for r in rows:
        if (
            r["arch"] in LINEAR
            and r["seq_len"] >= 8192
            and r.get("preset", "").endswith("1.3b")
            and "vs_transformer" in r
        ):
            add(
                f"{r['preset']} faster than transformer-1.3b at {r['seq_len']}x{r['batch']}",
                r["vs_transformer"],
                r["vs_transformer"] > 1.0,
            )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Tokens/s and peak memory against sequence length, one line per preset (matplotlib optional)."""
    plt = pyplot("train")
    if plt is None:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    with_mem = any(r.get("peak_mem_gb") is not None for r in ok)
    fig, axes = plt.subplots(1, 2 if with_mem else 1, figsize=(13 if with_mem else 7, 5), squeeze=False)
    axes = axes[0]
    for name in dict.fromkeys(r["preset"] for r in ok):
        pts = sorted((r["seq_len"], r) for r in ok if r["preset"] == name)
        axes[0].plot([s for s, _ in pts], [r["tokens_per_s"] / 1e3 for _, r in pts], marker="o", label=name)
        if with_mem:
            mem = [(s, r["peak_mem_gb"]) for s, r in pts if r.get("peak_mem_gb") is not None]
            axes[1].plot([s for s, _ in mem], [m for _, m in mem], marker="o", label=name)
    labels = {r["seq_len"]: f"{_tokens(r['seq_len'])}×{r['batch']}" for r in ok}
    for ax, what in zip(axes, ("training throughput (K tokens/s)", "peak memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(labels), [labels[s] for s in sorted(labels)])
        ax.set_xlabel("sequence length × batch")
        ax.set_ylabel(what)
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    env = environment()
    how = [
        "bf16 autocast" if ok[0].get("precision") == "bf16" else "fp32",
        "compiled blocks" if ok[0].get("compile") else "eager",
        "activation checkpointing " + "/".join(dict.fromkeys(r["activation_checkpointing"] for r in ok)),
    ]
    fig.suptitle(f"mixlab training benchmark — {env.get('device')} — {', '.join(how)} — {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_suite(
    presets: list[str],
    shapes: list[tuple[int, int]],
    device: torch.device,
    steps: int,
    warmup: int,
    ac: str,
    compile_blocks: bool,
    backend: str | None,
    peak_flops: float | None,
    long_shape: tuple[int, int] | None,
    isolate: bool = False,
    point_timeout: float = 1800.0,
    oom_retry_ac: str = "none",
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    profile: bool = False,
    keep_states: str = "off",
) -> list[dict[str, Any]]:
    """Every (preset, shape) point, in this process or (``isolate``) each in a fresh one; a point that
    runs out of memory is retried once with ``oom_retry_ac`` activation checkpointing (unless ``none``);
    ``ac="auto"`` tries the modes of :func:`ac_ladder` in turn instead, until one fits. ``keep_states``
    (``train.keep_states``): ``on``, ``off``, or ``auto``: first kept where the point runs without
    checkpointing and :func:`keep_states_fit` estimates that it fits, then (out of memory) not.
    ``on_row(rows)`` is called after every point (the partial results are saved by it)."""
    points = [(p, s, b) for p in presets for s, b in shapes]
    if long_shape is not None:
        size = presets[0].rsplit("-", 1)[-1]
        points += [(f"{a}-{size}", *long_shape) for a in LONG_ARCHS if (f"{a}-{size}", *long_shape) not in points]
    rows: list[dict[str, Any]] = []
    lost: str | None = None  # a CUDA error that leaves this process's context unusable
    for i, (preset, seq, batch) in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {preset} {seq}x{batch} ...", end=" ", flush=True)
        if lost is not None:
            row = {"preset": preset, "arch": _arch(preset), "seq_len": seq, "batch": batch, "status": "skipped",
                   "error": f"the CUDA context was lost earlier ({lost}); rerun with --isolate"}  # fmt: skip
        else:
            first: dict[str, Any] | None = None
            if ac == "auto":
                acs = ac_ladder(preset, device, seq * batch)
            else:
                acs = list(dict.fromkeys((ac, oom_retry_ac if oom_retry_ac != "none" else ac)))
            modes = [(m, keep_states == "on") for m in acs]
            if keep_states == "auto" and acs[0] == "none" and _keep_states_fit(preset, device, seq * batch):
                modes.insert(0, ("none", True))
            tried: list[str] = []
            for mode, keep in modes:
                tried.append(mode + (" + kept states" if keep else ""))
                if first is not None:
                    print(f"oom; again with {tried[-1]} ...", end=" ", flush=True)
                if isolate:
                    row = _point_in_subprocess(
                        preset, seq, batch, device, steps, warmup, mode, compile_blocks, backend, point_timeout, profile,
                        keep,
                    )  # fmt: skip
                else:
                    row = bench_point(
                        preset, seq, batch, device, steps, warmup, mode, compile_blocks, backend, peak_flops, profile,
                        keep,
                    )  # fmt: skip
                    if row["status"] == "error" and _context_lost(row.get("error", "")):
                        lost = row["error"]
                if row["status"] != "oom":
                    break
                first = first or row
            if first is not None and first is not row:
                row["oom_with_ac"] = tried[0]  # the first attempt ran out of memory
                row["ac_tried"] = tried  # every mode tried, the last one timed
        row["size"] = preset.rsplit("-", 1)[-1]
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if row["status"] == "ok":
            mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
            mem = f", peak {row['peak_mem_gb']:.1f} GB" if row.get("peak_mem_gb") is not None else ""
            kept = f", chunk states kept by {row['keep_states']} layers" if row.get("keep_states") else ""
            print(f"{row['tokens_per_s']:,.0f} tokens/s{mfu}{mem}{kept}", flush=True)
        else:
            print(row["status"] + (f" ({row['error']})" if "error" in row else ""), flush=True)
    add_ratios(rows)
    return rows


def _context_lost(error: str) -> bool:
    e = error.lower()
    return any(
        s in e for s in ("illegal memory access", "device-side assert", "unspecified launch failure", "cuda error")
    )


def _point_in_subprocess(
    preset: str,
    seq: int,
    batch: int,
    device: torch.device,
    steps: int,
    warmup: int,
    ac: str,
    compile_blocks: bool,
    backend: str | None,
    timeout: float,
    profile: bool = False,
    keep_states: bool = False,
) -> dict[str, Any]:
    """One point in a fresh ``mixlab bench train`` process (a crashed kernel cannot take the suite down)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mixlab-bench-train-") as tmp:
        cmd = [
            sys.executable, "-m", "mixlab", "bench", "train", "--presets", preset, "--shapes", f"{seq}x{batch}",
            "--steps", str(steps), "--warmup", str(warmup), "--ac", ac, "--device", str(device), "--no-plot",
            "--out-dir", tmp, "--keep-states", "on" if keep_states else "off",
        ]  # fmt: skip
        if compile_blocks:
            cmd.append("--compile")
        if profile:
            cmd.append("--profile")
        if backend:
            cmd += ["--backend", backend]
        base = {"preset": preset, "arch": _arch(preset), "seq_len": seq, "batch": batch}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "status": "error", "error": f"timed out after {timeout:g} s"}
        files = sorted(Path(tmp).glob("train-*.json"))
        if proc.returncode != 0 or not files:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            return {**base, "status": "error", "error": f"exit code {proc.returncode}: {tail[0][:300]}"}
        return json.loads(files[0].read_text())["rows"][0]


def run(args: argparse.Namespace) -> int:
    from ..models import list_presets
    from ..train.metrics import device_peak_flops
    from ..train.parallel import training_allocator

    training_allocator()  # as the trainer: before the first CUDA allocation
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    quick = args.quick
    presets = [p.strip() for p in (args.presets or ",".join(QUICK_PRESETS if quick else DEFAULT_PRESETS)).split(",")]
    presets = [p for p in presets if p]
    unknown = [p for p in presets if p not in list_presets()]
    if unknown:
        print(f"bench train: unknown preset(s) {', '.join(unknown)}; see `mixlab models`")
        return 2
    try:
        shapes = parse_shapes(args.shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES))
    except ValueError as e:
        print(f"bench train: {e}")
        return 2
    from ..config import ac_selective_arg

    for flag, mode in (("--ac", args.ac), ("--oom-retry-ac", args.oom_retry_ac)):
        try:
            if not (flag == "--ac" and mode == "auto"):
                ac_selective_arg(mode)
        except ValueError as e:
            print(f"bench train: {flag}: {e}" + (", or auto" if flag == "--ac" else ""))
            return 2
    steps, warmup = (min(args.steps, 2), min(args.warmup, 1)) if quick else (args.steps, args.warmup)
    if steps < 1 or warmup < 0:
        print("bench train: --steps must be >= 1 and --warmup >= 0")
        return 2
    if device.type != "cuda" and not quick:
        print("bench train: no CUDA device; the CPU runs float32 without MFU (use --quick for a smoke run)")
    if args.compile and warmup < 2:
        print("bench train: note: with --compile the first steps compile; --warmup 2 or more keeps them untimed")
    peak = device_peak_flops(device, args.peak_tflops)
    long_shape = (QUICK_LONG_SHAPE if quick else LONG_SHAPE) if args.long else None
    extra: dict[str, Any] = {
        "config": {
            "presets": presets, "shapes": [f"{s}x{b}" for s, b in shapes], "steps": steps, "warmup": warmup,
            "compile": args.compile, "activation_checkpointing": args.ac, "oom_retry_ac": args.oom_retry_ac,
            "keep_states": args.keep_states, "backend": args.backend,
            "long": list(long_shape) if long_shape else None, "isolate": args.isolate, "precision": "bf16 autocast, fp32 master weights" if device.type == "cuda" else "fp32",
            "peak_flops": peak,
        },
        "flops_formula": FLOPS_FORMULA,
    }  # fmt: skip

    def save_partial(done: list[dict[str, Any]]) -> None:
        # a run stopped early (a time limit) still leaves the points it measured
        save_results("train", done, extra={**extra, "partial": True}, out_dir=args.out_dir)

    rows = run_suite(
        presets, shapes, device, steps, warmup, args.ac, args.compile, args.backend, peak, long_shape, args.isolate,
        oom_retry_ac=args.oom_retry_ac, on_row=save_partial, profile=args.profile, keep_states=args.keep_states,
    )  # fmt: skip
    targets = check_targets(rows)
    extra["targets"] = targets
    path = save_results("train", rows, extra=extra, out_dir=args.out_dir)
    png = None if args.no_plot else plot(rows, path.with_suffix(".png"))
    long_rows = [r for r in rows if long_shape and (r["seq_len"], r["batch"]) == long_shape]
    for r in rows:
        if r.get("profile"):
            print_profile(r)
    print()
    print(format_table(rows, COLUMNS))
    if long_rows:
        print()
        print(f"{_tokens(long_shape[0])} x {long_shape[1]}: " + "; ".join(_mem_line(r) for r in long_rows))
    if targets:
        print()
        for t in targets:
            value = t["value"]
            shown = f"{value:,.4g}" if isinstance(value, float) and math.isfinite(value) else value
            print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}  ({shown})")
    print(f"\nMFU: {FLOPS_FORMULA}")
    print(f"results: {path}" + (f"\nplot:    {png}" if png else ""))
    return 0


def print_profile(row: dict[str, Any], top: int = 12) -> None:
    """The profile of one row: time by kernel class, then the top kernels."""
    prof = row["profile"]
    total = prof["total_ms"] or 1.0
    print(f"\nprofile {row['preset']} {row['seq_len']}x{row['batch']} ({row.get('ac')}): {prof['total_ms']:.1f} "
          f"{prof['unit']}")  # fmt: skip
    print("  " + ", ".join(f"{c} {ms:.1f} ({ms / total:.0%})" for c, ms in prof["by_class"].items()))
    for name, ms, n in prof["top"][:top]:
        print(f"  {ms:8.2f} ms  {n:5d}x  {name[:100]}")
    if prof.get("by_op"):
        print("  by launching op: " + "; ".join(f"{name[:70]} {ms:.1f} ({n}x)" for name, ms, n in prof["by_op"][:6]))
    if prof.get("host_top"):
        print(f"  host: {prof['host_ms']:.1f} ms self CPU time; top: " + ", ".join(
            f"{name[:60]} {ms:.1f} ({n}x)" for name, ms, n in prof["host_top"][:6]))  # fmt: skip
    if prof.get("span_ms"):
        print(f"  device span {prof['span_ms']:.1f} ms, busy {prof['busy_ms']:.1f}, idle {prof['idle_ms']:.1f} "
              f"({prof['idle_gaps_ms']:.1f} in gaps >= 20 us); longest: " + ", ".join(
            f"{ms:.2f} ({a[:30]} -> {b[:30]})" for ms, a, b in prof["gaps"][:4]))  # fmt: skip


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _mem_line(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        mem = f"peak {r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") is not None else "ran"
        return f"{r['preset']} {mem} at {r['tokens_per_s']:,.0f} tokens/s"
    mem = f" (peak {r['peak_mem_gb']:.1f} GB when it failed)" if r.get("peak_mem_gb") is not None else ""
    return f"{r['preset']} {r['status']}{mem}"
