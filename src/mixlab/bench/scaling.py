"""``mixlab bench scaling``: data-parallel scaling of the training loop over 1, 2, 4, 8 GPUs.

    mixlab bench scaling                                            # every visible GPU, 1.3b GDN + Transformer
    mixlab bench scaling --gpus 1,2,4,8 --strategies ddp,fsdp --seq-len 4096 --batch-per-gpu 8
    mixlab bench scaling --device cpu --presets gated_deltanet-tiny --gpus 1,2 --seq-len 128 \\
        --batch-per-gpu 4 --resume-check                            # the same on CPU processes (gloo)

Every point is a real ``torchrun --standalone --nproc_per_node N -m mixlab train`` run of the one
training loop (``parallel.strategy`` ddp or fsdp, the loader splitting the global batch over ranks)
on the stdlib corpus (or ``--data``), ``--warmup`` untimed steps then ``--steps`` timed ones. Weak
scaling: each GPU keeps ``--batch-per-gpu`` sequences, so the global batch is N times larger and the
scaling efficiency is ``tokens/s(N) / (N · tokens/s(1))`` of the same preset and strategy.

``--resume-check`` also trains the largest world size W for ``2k`` steps with a checkpoint at step
``k``, resumes that checkpoint on W/2 ranks (resharded by ``torch.distributed.checkpoint``) and
reports how far the resumed losses of steps k+1..2k are from the uninterrupted run's — the
"written on 8 GPUs, resumed on 4" check.

On the CPU each rank is a gloo process with one thread (a functional check of the same code path,
not a speed figure). Results: ``benchmarks/results/scaling-<device>-<date>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mixlab.bench.common import environment, format_table, pyplot, save_results

DEFAULT_PRESETS = "gated_deltanet-1.3b,transformer-1.3b"
COLUMNS = ["preset", "strategy", "gpus", "status", "global_batch", "tokens_per_s", "per_gpu", "efficiency",
           "mfu", "peak_mem_gb", "step_ms"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=DEFAULT_PRESETS, help=f"comma-separated (default {DEFAULT_PRESETS})")
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated: ddp, fsdp (default both)")
    parser.add_argument(
        "--gpus", default=None, help="comma-separated world sizes (default 1, 2, 4, ... up to the visible GPUs)"
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-per-gpu", type=int, default=8, help="sequences per rank per step (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--ac", default="none", help="train.activation_checkpointing of every point (default none)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")
    parser.add_argument("--data", default="stdlib", help="data.source of every point (default the stdlib corpus)")
    parser.add_argument("--work-dir", default=None, help="run directories (default: a temporary directory)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per point before it is stopped")
    parser.add_argument(
        "--resume-check", action="store_true", help="checkpoint on the largest world size, resume on half of it"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_sizes(spec: str | None, device: str) -> list[int]:
    """``--gpus`` as a list; by default powers of two up to the visible GPUs (CPU: 1, 2)."""
    if spec:
        sizes = [int(x) for x in spec.split(",") if x.strip()]
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"--gpus {spec!r}: expected positive world sizes such as 1,2,4,8")
        return sorted(set(sizes))
    limit = 2 if device == "cpu" else max(1, _visible_gpus())
    return [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= limit]


def train_command(
    preset: str, strategy: str, nproc: int, run_dir: Path, args: argparse.Namespace, max_steps: int, extra: list[str]
) -> list[str]:
    """The ``torchrun ... -m mixlab train`` command line of one point."""
    overrides = [
        f"model={preset}",
        f"data.source={args.data}",
        "data.tokenizer=byte",
        "data.model_vocab=grow",
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch_per_gpu * nproc}",
        f"train.max_steps={max_steps}",
        "train.warmup_steps=0",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=0",
        "train.save_final=false",
        "train.export=false",
        f"train.activation_checkpointing={args.ac}",
        f"parallel.strategy={strategy}",
        "log.progress=false",
        f"run.dir={run_dir}",
    ]
    if args.device == "cpu":
        overrides.append("run.device=cpu")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "mixlab", "train", *overrides, *extra,
    ]  # fmt: skip


def _run(cmd: list[str], log_path: Path, timeout: float, device: str) -> tuple[int, float]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def step_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step training rows of a run's metrics.jsonl (the loop logs every step here)."""
    from mixlab.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if "tokens_per_s" in r]


def summarize(rows: list[dict[str, Any]], warmup: int, tokens_per_step: int) -> dict[str, Any]:
    """Median step time and tokens/s of the steps after ``warmup``; peak memory and MFU of rank 0."""
    timed = [r for r in rows if r["step"] > warmup]
    if not timed:
        return {"status": "no timed steps"}
    step_s = statistics.median(tokens_per_step / r["tokens_per_s"] for r in timed)
    out: dict[str, Any] = {
        "status": "ok",
        "timed_steps": len(timed),
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens_per_step / step_s,
        "loss_last": timed[-1]["loss"],
    }
    mems = [r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None]
    if mems:
        out["peak_mem_gb"] = max(mems)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    if mfus:
        out["mfu"] = statistics.median(mfus)
    return out


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    """``per_gpu`` tokens/s and ``efficiency`` against the same preset and strategy on one GPU."""
    base = {(r["preset"], r["strategy"]): r["tokens_per_s"] for r in rows if r["status"] == "ok" and r["gpus"] == 1}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["per_gpu"] = r["tokens_per_s"] / r["gpus"]
        one = base.get((r["preset"], r["strategy"]))
        if one:
            r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * one)


def resume_check(
    preset: str, strategy: str, world: int, work: Path, args: argparse.Namespace, extra: list[str]
) -> dict[str, Any]:
    """Train ``world`` ranks for 2k steps (checkpoint at k); resume step k on ``world // 2`` ranks."""
    k = max(2, args.steps // 2)
    half = max(1, world // 2)
    row: dict[str, Any] = {"check": "resume", "preset": preset, "strategy": strategy, "saved_on": world,
                           "resumed_on": half, "checkpoint_step": k, "steps": 2 * k}  # fmt: skip
    full_dir, resumed_dir = work / f"resume-{preset}-{strategy}-full", work / f"resume-{preset}-{strategy}-resumed"
    # same global batch on both world sizes: the loader gives the same sequences, split differently
    global_batch = args.batch_per_gpu * world
    if global_batch % half:
        return {**row, "status": f"global batch {global_batch} does not split over {half} ranks"}
    ns = argparse.Namespace(**{**vars(args), "batch_per_gpu": global_batch // half})
    cmd = train_command(preset, strategy, world, full_dir, args, 2 * k, [*extra, f"train.save_every={k}"])
    rc, _ = _run(cmd, work / f"{full_dir.name}.log", args.timeout, args.device)
    if rc != 0:
        return {**row, "status": f"full run failed (rc {rc}): {_tail(work / f'{full_dir.name}.log')}"}
    ckpt = full_dir / "checkpoints" / f"step_{k:08d}"
    if not ckpt.is_dir():
        return {**row, "status": f"no checkpoint at {ckpt}"}
    resumed_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, resumed_dir / "checkpoints" / ckpt.name)
    cmd = train_command(preset, strategy, half, resumed_dir, ns, 2 * k, extra)
    rc, _ = _run(cmd, work / f"{resumed_dir.name}.log", args.timeout, args.device)
    if rc != 0:
        return {**row, "status": f"resumed run failed (rc {rc}): {_tail(work / f'{resumed_dir.name}.log')}"}
    full = {r["step"]: r["loss"] for r in step_rows(full_dir)}
    resumed = {r["step"]: r["loss"] for r in step_rows(resumed_dir)}
    steps = sorted(s for s in resumed if s > k)
    if steps != list(range(k + 1, 2 * k + 1)):
        return {**row, "status": f"resumed run logged steps {steps}, expected {k + 1}..{2 * k}"}
    diffs = [abs(resumed[s] - full[s]) / max(abs(full[s]), 1e-12) for s in steps]
    return {**row, "status": "ok", "max_rel_loss_diff": max(diffs),
            "losses_full": [full[s] for s in steps], "losses_resumed": [resumed[s] for s in steps]}  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Tokens/s against world size with the ideal line, and the efficiency, per preset and strategy."""
    plt = pyplot("scaling")
    if plt is None:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in dict.fromkeys((r["preset"], r["strategy"]) for r in ok):
        pts = sorted(
            (r["gpus"], r["tokens_per_s"], r.get("efficiency")) for r in ok if (r["preset"], r["strategy"]) == key
        )
        label = f"{key[0]} {key[1]}"
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        one = next((p[1] for p in pts if p[0] == 1), None)
        if one:
            ax.plot([p[0] for p in pts], [one * p[0] for p in pts], ":", color=line.get_color(), alpha=0.6)
        eff = [(p[0], p[2]) for p in pts if p[2] is not None]
        if eff:
            ax2.plot([e[0] for e in eff], [e[1] for e in eff], "o-", color=line.get_color(), label=label)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s (dotted: linear scaling)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("throughput")
    ax2.set_xlabel("GPUs")
    ax2.set_ylabel("scaling efficiency")
    ax2.set_xscale("log", base=2)
    ax2.axhline(0.9, color="gray", ls="--", lw=0.8)
    ax2.set_ylim(0, 1.1)
    ax2.set_title("tokens/s(N) / (N · tokens/s(1))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    from mixlab.config import ac_selective_arg

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        raise SystemExit(f"bench scaling: --device {args.device!r}; allowed: auto, cpu, cuda")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in ("ddp", "fsdp"):
            raise SystemExit(f"bench scaling: --strategies {s!r}; allowed: ddp, fsdp")
    try:
        ac_selective_arg(args.ac)  # refused here, not once per torchrun point
    except ValueError as e:
        raise SystemExit(f"bench scaling: --ac: {e}") from None
    sizes = world_sizes(args.gpus, args.device)
    visible = _visible_gpus() if args.device == "cuda" else None
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mixlab-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = list(args.overrides)
    tokens_per_gpu = args.batch_per_gpu * args.seq_len
    rows: list[dict[str, Any]] = []
    try:
        for preset in presets:
            for strategy in strategies:
                for n in sizes:
                    row: dict[str, Any] = {"preset": preset, "strategy": strategy, "gpus": n,
                                           "seq_len": args.seq_len, "global_batch": args.batch_per_gpu * n,
                                           "tokens_per_step": tokens_per_gpu * n, "ac": args.ac}  # fmt: skip
                    if visible is not None and n > visible:
                        rows.append({**row, "status": f"skipped: {visible} GPU(s) visible"})
                        continue
                    run_dir = work / f"{preset}-{strategy}-{n}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    cmd = train_command(preset, strategy, n, run_dir, args, args.warmup + args.steps, extra)
                    print(f"[{preset} {strategy} x{n}] {shlex.join(cmd)}", flush=True)
                    rc, wall = _run(cmd, work / f"{run_dir.name}.log", args.timeout, args.device)
                    row["wall_s"] = round(wall, 1)
                    if rc != 0:
                        why = "timeout" if rc == 124 else f"rc {rc}"
                        row["status"] = f"failed ({why}): {_tail(work / f'{run_dir.name}.log')}"
                    else:
                        row.update(summarize(step_rows(run_dir), args.warmup, tokens_per_gpu * n))
                    rows.append(row)
                    print(f"  -> {row['status']} {row.get('tokens_per_s', 0):,.0f} tokens/s", flush=True)
                    if not args.keep_runs:
                        shutil.rmtree(run_dir, ignore_errors=True)
        add_efficiency(rows)
        checks = []
        if args.resume_check:
            world = max(n for n in sizes if visible is None or n <= visible)
            for preset in presets:
                for strategy in strategies:
                    if world < 2:
                        checks.append({"check": "resume", "preset": preset, "strategy": strategy,
                                       "status": "skipped: needs a world size of at least 2"})  # fmt: skip
                        continue
                    checks.append(resume_check(preset, strategy, world, work, args, extra))
    finally:
        if not args.keep_runs and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: getattr(args, k) for k in ("seq_len", "batch_per_gpu", "steps", "warmup", "ac", "device", "data")}
    path = save_results("scaling", rows, {"settings": settings, "checks": checks}, args.out_dir)
    if not args.no_plot:
        png = plot(rows, path.with_suffix(".png"))
        if png:
            print(f"plot: {png}")
    print(f"results: {path}")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}")
    print(format_table(rows, COLUMNS))
    for c in checks:
        print(json.dumps({k: v for k, v in c.items() if not k.startswith("losses")}))
    bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    bad += [c for c in checks if c["status"] != "ok" and not c["status"].startswith("skipped")]
    return 1 if bad else 0
