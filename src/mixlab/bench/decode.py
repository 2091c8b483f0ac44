"""``mixlab bench decode``: prefill time, per-token decode latency and memory of the model presets.

For each preset, batch size and context length: build the model (random weights, ``--dtype``), fill a
fresh decode cache with a prefill of ``context`` random tokens (timed), then time ``--steps`` one-token
decode steps (each a model step and a greedy pick, as ``generate`` runs them, captured in a CUDA graph
by default on GPU) after ``--warmup`` untimed ones. Reported per row: prefill ms and tokens/s,
per-token ms, decode tokens/s, the cache's size and the peak memory of prefill and decode.

What the numbers should show: the recurrent mixers' (Mamba, Mamba2, DeltaNet, Gated DeltaNet)
per-token latency and cache do not grow with the context; attention's KV cache and latency do, and
sliding-window layers stay bounded. The targets of issue 7 are checked at the end (``targets``).

Cheap by design: a few timed steps per point; anything that runs out of memory is recorded as
``oom`` and skipped (a prefill that does not fit in one call is retried in chunks of
``--prefill-chunk`` tokens first). The table is printed last; JSON and a PNG plot go to
``benchmarks/results/`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
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
QUICK_PRESETS = ("transformer-tiny", "gated_deltanet-tiny")
COLUMNS = [
    "preset", "batch", "context", "status", "prefill_ms", "prefill_tok_s", "decode_ms_per_token",
    "decode_tok_s", "cache_mb", "prefill_peak_gb", "decode_peak_gb", "cuda_graph",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=None, help="comma-separated model presets (default: every 1.3b one)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths (default 1024,8192,32768)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per point (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default 3)")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="timed prefills per point (median)")
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="chunk size of the retry after a prefill OOM")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda:N")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly even on CUDA")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny presets, contexts 32,128, batches 1,2, 3 steps (explicit options still apply)",
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cache_bytes(cache: Any) -> int:
    """Bytes held by the tensors of a decode cache (each storage counted once)."""
    from ..generate import _layer_caches, _leaves

    seen, total = set(), 0
    for _, t in _leaves(_layer_caches(cache)):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run ``ids [B, T]`` through ``cache`` (in chunks of ``chunk`` tokens when > 0): next-token ids ``[B]``."""
    pieces = [ids] if chunk <= 0 else list(ids.split(chunk, dim=1))
    for piece in pieces:
        h = model.forward_hidden(piece, cache)
    return model.lm_head(h[:, -1]).argmax(-1)  # only the last position's logits: [B, T, V] would not fit


def measure_point(
    model, batch: int, context: int, steps: int, warmup: int, prefill_repeats: int, prefill_chunk: int, cuda_graph: bool
) -> dict[str, Any]:
    """One (batch, context) point of one model: see the module doc for the fields."""
    from ..generate import DecodeStep, use_row_positions

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    row: dict[str, Any] = {"batch": batch, "context": context, "status": "ok"}
    gen = torch.Generator(device="cpu").manual_seed(context + batch)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    max_len = context + warmup + steps + 1
    prefill_times: list[float] = []
    chunk = 0
    step = cache = None
    # The first prefill is untimed: it pays for kernel compilation and autotuning at this shape.
    for attempt in range(1 + max(1, prefill_repeats)):
        cache = step = None
        free_memory(device)
        cache = use_row_positions(model.init_cache(batch, max_len), batch, device)
        step = DecodeStep(model, cache, batch, cuda_graph=cuda_graph)
        _reset_peak(device)
        cuda_sync(device)
        t0 = time.perf_counter()
        try:
            tok = _prefill(model, cache, ids, chunk)
        except Exception as e:  # OOM: retry once in chunks, then give up on this point
            if not is_oom(e) or chunk or prefill_chunk <= 0 or context <= prefill_chunk:
                raise
            cache = step = None
            free_memory(device)
            chunk = prefill_chunk
            cache = use_row_positions(model.init_cache(batch, max_len), batch, device)
            step = DecodeStep(model, cache, batch, cuda_graph=cuda_graph)
            _reset_peak(device)
            cuda_sync(device)
            t0 = time.perf_counter()
            tok = _prefill(model, cache, ids, chunk)
        cuda_sync(device)
        if attempt > 0:
            prefill_times.append((time.perf_counter() - t0) * 1e3)
    row["prefill_ms"] = statistics.median(prefill_times)
    row["prefill_tok_s"] = batch * context / (row["prefill_ms"] / 1e3)
    row["prefill_chunk"] = chunk or None
    row["prefill_peak_gb"] = _peak_gb(device)
    row["cache_mb"] = cache_bytes(cache) / 2**20
    row["cuda_graph"] = step.graph is not None
    if cuda_graph and step.graph is None:
        row["why_eager"] = step.why_eager
    step.after_prefill()
    _reset_peak(device)
    for _ in range(warmup):
        tok = step(tok).argmax(-1)
    cuda_sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok).argmax(-1)
    cuda_sync(device)
    per_token = (time.perf_counter() - t0) * 1e3 / max(steps, 1)
    row["decode_ms_per_token"] = per_token
    row["decode_tok_s"] = batch / (per_token / 1e3)
    row["decode_peak_gb"] = _peak_gb(device)
    del cache, step
    free_memory(device)
    return row


def run_suite(
    presets: list[str],
    batch_sizes: list[int],
    contexts: list[int],
    steps: int,
    warmup: int,
    dtype: torch.dtype,
    device: torch.device,
    cuda_graph: bool,
    prefill_repeats: int = 1,
    prefill_chunk: int = 8192,
    log=print,
) -> list[dict[str, Any]]:
    """Every (preset, batch, context) point; points that fail are rows with ``status`` set."""
    from ..models import build_model, get_preset

    rows: list[dict[str, Any]] = []
    for name in presets:
        try:
            model = build_model(get_preset(name), device=device, dtype=dtype).eval()
        except Exception as e:
            status = "oom" if is_oom(e) else f"error: {type(e).__name__}: {e}"
            log(f"{name}: model build failed ({status})")
            rows += [
                {"preset": name, "batch": b, "context": c, "status": status} for b in batch_sizes for c in contexts
            ]
            free_memory(device)
            continue
        params = model.num_parameters()
        for b in batch_sizes:
            for c in contexts:
                try:
                    with torch.inference_mode():
                        row = measure_point(model, b, c, steps, warmup, prefill_repeats, prefill_chunk, cuda_graph)
                except Exception as e:
                    if not is_oom(e):
                        log(f"{name} B={b} T={c}: {type(e).__name__}: {e}")
                    row = {
                        "batch": b,
                        "context": c,
                        "status": "oom" if is_oom(e) else f"error: {type(e).__name__}: {e}",
                    }
                    free_memory(device)
                row = {"preset": name, "params": params, **row}
                rows.append(row)
                log(_one_line(row))
        del model
        free_memory(device)
    return rows


def _one_line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['preset']:<22} B={r['batch']:<3} T={r['context']:<6} {r['status']}"
    return (
        f"{r['preset']:<22} B={r['batch']:<3} T={r['context']:<6} prefill {r['prefill_ms']:9.1f} ms   "
        f"decode {r['decode_ms_per_token']:7.3f} ms/token   cache {r['cache_mb']:9.1f} MB"
        + ("   (graph)" if r.get("cuda_graph") else "")
    )


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 7's targets, where the rows hold the points they need: per-token latency of Gated DeltaNet
    and Mamba2 at the longest context <= 1.1x at the shortest, below the Transformer's from 8K on;
    batch-1 Gated DeltaNet per-token latency <= 5 ms."""
    ok = {(r["preset"].rsplit("-", 1)[0], r["batch"], r["context"]): r for r in rows if r["status"] == "ok"}
    out = []
    contexts = sorted({k[2] for k in ok})
    batches = sorted({k[1] for k in ok})
    if not contexts:
        return out
    lo, hi = contexts[0], contexts[-1]
    for arch in ("gated_deltanet", "mamba2"):
        for b in batches:
            a, z = ok.get((arch, b, lo)), ok.get((arch, b, hi))
            if a and z and hi > lo:
                ratio = z["decode_ms_per_token"] / a["decode_ms_per_token"]
                out.append({"target": f"{arch} B={b}: latency at {hi} <= 1.1x latency at {lo}", "value": ratio,
                            "pass": ratio <= 1.1})  # fmt: skip
            for c in contexts:
                t, m = ok.get(("transformer", b, c)), ok.get((arch, b, c))
                if c >= 8192 and t and m:
                    out.append({"target": f"{arch} B={b} T={c}: latency below the Transformer's",
                                "value": m["decode_ms_per_token"] / t["decode_ms_per_token"],
                                "pass": m["decode_ms_per_token"] < t["decode_ms_per_token"]})  # fmt: skip
    for c in contexts:
        g = ok.get(("gated_deltanet", 1, c))
        if g:
            out.append({"target": f"gated_deltanet B=1 T={c}: per-token latency <= 5 ms",
                        "value": g["decode_ms_per_token"], "pass": g["decode_ms_per_token"] <= 5.0})  # fmt: skip
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Per-token latency and prefill time against context, one panel per batch size."""
    plt = pyplot("decode")
    if plt is None:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in ok})
    if not batches:
        return None
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for j, b in enumerate(batches):
        for name in dict.fromkeys(r["preset"] for r in ok):
            pts = sorted((r["context"], r) for r in ok if r["preset"] == name and r["batch"] == b)
            if not pts:
                continue
            xs = [c for c, _ in pts]
            axes[0][j].plot(xs, [r["decode_ms_per_token"] for _, r in pts], marker="o", label=name)
            axes[1][j].plot(xs, [r["prefill_ms"] for _, r in pts], marker="o", label=name)
        for i, what in enumerate(("decode ms / token", "prefill ms")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(what)
            ax.set_title(f"batch {b}: {what}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    env = environment()
    fig.suptitle(f"mixlab decode benchmark — {env.get('device')} — {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    quick = args.quick
    presets = (args.presets or ",".join(QUICK_PRESETS if quick else DEFAULT_PRESETS)).split(",")
    presets = [p.strip() for p in presets if p.strip()]
    batches = _ints(args.batch_sizes or ("1,2" if quick else "1,16"))
    contexts = _ints(args.contexts or ("32,128" if quick else "1024,8192,32768"))
    steps, warmup = (min(args.steps, 3), min(args.warmup, 1)) if quick else (args.steps, args.warmup)
    from ..models import list_presets

    unknown = [p for p in presets if p not in list_presets()]
    if unknown:
        print(f"bench decode: unknown preset(s) {', '.join(unknown)}; see `mixlab models`")
        return 2
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32 and not args.quick:
        print(f"bench decode: running {args.dtype} on the CPU (slow); --dtype float32 is the CPU's native type")
    if device.type == "cpu" and args.quick:
        dtype = torch.float32
    cuda_graph = device.type == "cuda" and not args.no_cuda_graph
    rows = run_suite(
        presets, batches, contexts, steps, warmup, dtype, device, cuda_graph, args.prefill_repeats, args.prefill_chunk
    )
    targets = check_targets(rows)
    extra = {
        "config": {
            "presets": presets, "batch_sizes": batches, "contexts": contexts, "steps": steps, "warmup": warmup,
            "dtype": str(dtype).replace("torch.", ""), "cuda_graph": cuda_graph,
        },
        "targets": targets,
    }  # fmt: skip
    path = save_results("decode", rows, extra=extra, out_dir=args.out_dir)
    png = None if args.no_plot else plot(rows, path.with_suffix(".png"))
    print()
    print(format_table(rows, COLUMNS))
    if targets:
        print()
        for t in targets:
            value = f"{t['value']:.3g}" if isinstance(t["value"], float) and math.isfinite(t["value"]) else t["value"]
            print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}  ({value})")
    print(f"\nresults: {path}" + (f"\nplot:    {png}" if png else ""))
    return 0
