"""The MQAR science check: which 2-layer models recall 16 key-value pairs in 256 tokens.

    python -m mixlab.eval.mqar_sweep --budget-min 6.25 --jobs 16      # the whole sweep on one GPU
    python -m mixlab.eval.mqar_sweep --device cpu --budget-min 10 --seq-len 64 --kv-pairs 4 \\
        --archs transformer,gated_deltanet --d-models 64 --lrs 3e-3 --vocab-size 256 --batch-size 32

For every architecture × d_model × learning rate it trains a model on Zoology's MQAR generator
with ``mixlab train task=mqar`` (the one training loop: ``mixlab.train.train``), then measures
accuracy over the queries of a held-out test set (``mixlab.eval.mqar``). Training reads a fixed set
of ``--train-examples`` sequences in epochs, as Zoology does (0: a fresh batch every step).

``--jobs N`` trains N points at once, each in its own process (default 16 on a GPU: 2-layer models
are launch-bound, and a GPU time-slices well between processes); only this process writes the
results. The time budget is split over the points still to run (over ``ceil(left / N)`` waves with
jobs); each point first times 20 steps, then trains for as many steps as its share allows
(``--max-steps`` at most); a point still training at 1.25x its share, or at the budget's end, is
stopped and evaluated at that step (``stopped_by_budget`` in its row). Models follow Zoology's MQAR
setup: 2 layers, mixer-only blocks (no MLP), vocabulary 8192, AdamW with weight decay 0.1, best
accuracy over the learning rates. Attention has 1 head; DeltaNet and Gated DeltaNet 2 heads of
d_model/2 (Gated DeltaNet with expand_v 1, the same state as DeltaNet); Mamba uses d_state 16, expand 2.

Results go to ``benchmarks/results/mqar-L{L}-kv{n}-{device}.json`` (rewritten after every point, so
an interrupted sweep keeps what it finished, and a rerun skips the points already there unless
``--fresh``) and a PNG of the best accuracy per model; the last lines printed are the table. With
jobs, each point's log and row are under ``{work-dir}/logs/``.
"""

from __future__ import annotations

import _thread
import argparse
import json
import os
import shlex
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ARCHS", "add_arguments", "main", "model_overrides", "run", "run_sweep"]

#: architecture -> (preset whose defaults start the model, mixer overrides at width d)
ARCHS: dict[str, str] = {
    "transformer": "transformer-tiny",
    "deltanet": "deltanet-tiny",
    "gated_deltanet": "gated_deltanet-tiny",
    "mamba": "mamba-tiny",
    "mamba2": "mamba2-tiny",
}
DEFAULT_ARCHS = ("transformer", "gated_deltanet", "deltanet", "mamba")


def model_overrides(arch: str, d_model: int) -> list[str]:
    """``key=value`` overrides of the 2-layer MQAR model of ``arch`` at width ``d_model``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(ARCHS)}")
    ov = [
        f"model={ARCHS[arch]}",
        f"model.name=mqar-{arch}-d{d_model}",
        f"model.d_model={d_model}",
        "model.n_layers=2",
        "model.d_intermediate=0",
    ]
    if arch == "transformer":
        ov += ["model.attention.n_heads=1"]
    elif arch == "deltanet":
        ov += ["model.deltanet.n_heads=2", f"model.deltanet.head_dim={d_model // 2}"]
    elif arch == "gated_deltanet":
        ov += ["model.gated_deltanet.n_heads=2", f"model.gated_deltanet.head_dim={d_model // 2}"]
        ov += ["model.gated_deltanet.expand_v=1.0"]
    elif arch == "mamba2":
        ov += [f"model.mamba2.headdim={min(64, d_model)}", "model.mamba2.d_state=64", "model.mamba2.chunk_size=64"]
    return ov


def _csv(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--d-models", default="64,128", help="model widths (default 64,128)")
    parser.add_argument("--lrs", default="3e-3,1e-2", help="learning rates; the best is reported (default 3e-3,1e-2)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--kv-pairs", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256, help="sequences per step (Zoology: 256)")
    parser.add_argument("--budget-min", type=float, default=60.0, help="wall-clock budget of the whole sweep")
    parser.add_argument("--max-steps", type=int, default=20000, help="steps per point at most")
    parser.add_argument("--min-steps", type=int, default=50, help="steps per point at least")
    parser.add_argument("--eval-examples", type=int, default=1000, help="held-out sequences per point")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--jobs", type=int, default=0,
        help="points trained at once, each its own process (default: 16 on a GPU, 1 on the CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--train-examples", type=int, default=100_000,
        help="a fixed training set of this many sequences, read in epochs as Zoology does (0: fresh batches)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="runs/mqar-sweep", help="where the runs are trained")
    parser.add_argument("--fresh", action="store_true", help="redo points already in the result file")
    parser.add_argument("--tag", default="", help="suffix of the result file name")


def _step_seconds(run_dir: Path) -> float:
    """Median seconds per optimizer step of a run (its first steps left out as warm-up)."""
    from mixlab.train.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("tokens_per_s")]
    per_step = rows[0]["tokens"] / rows[0]["step"] if rows else 1
    times = [per_step / r["tokens_per_s"] for r in rows[3:] or rows]
    return statistics.median(times) if times else float("inf")


class _Deadline:
    """Stops training after ``seconds`` the way a preemption does: SIGUSR1, on which the training loop finishes
    its step, writes a checkpoint and returns ``"preempted"``. If the loop has not returned ``grace`` seconds
    later (e.g. still before its first step), the main thread gets a KeyboardInterrupt. (An interrupt alone
    can land inside the optimizer update, where the loop stops without a checkpoint to score.) ``fired``
    tells either apart from a user's Ctrl-C."""

    def __init__(self, seconds: float, grace: float = 30.0) -> None:
        self.fired = False
        self._signal = hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread()
        self._timers = [threading.Timer(seconds, self._stop)]
        if self._signal:
            self._timers.append(threading.Timer(seconds + grace, _thread.interrupt_main))
        for t in self._timers:
            t.daemon = True

    def _stop(self) -> None:
        self.fired = True
        if self._signal:
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            _thread.interrupt_main()

    def __enter__(self) -> _Deadline:
        if self._signal:  # a signal that arrives after the loop has returned (and restored this handler) is ignored
            self._previous = signal.signal(signal.SIGUSR1, lambda *_: None)
        for t in self._timers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._timers:
            t.cancel()
        if self._signal:
            signal.signal(signal.SIGUSR1, self._previous if self._previous is not None else signal.SIG_DFL)


def _plot(path: Path, best: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(b["arch"] for b in best))
    widths = sorted({b["d_model"] for b in best})
    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 + 0.7 * len(widths) * len(archs)), 4.2))
    w = 0.8 / max(1, len(archs))
    for i, arch in enumerate(archs):
        xs, ys = [], []
        for j, d in enumerate(widths):
            hit = [b for b in best if b["arch"] == arch and b["d_model"] == d]
            if hit:
                xs.append(j + (i - (len(archs) - 1) / 2) * w)
                ys.append(hit[0]["accuracy"])
        bars = ax.bar(xs, ys, width=w, label=arch)
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, y + 0.01, f"{y:.2f}", ha="center", fontsize=7)
    ax.axhline(0.95, color="grey", ls=":", lw=1)
    ax.text(0.995, 0.955, "0.95", color="grey", fontsize=7, ha="right", va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xticks(range(len(widths)))
    ax.set_xticklabels([f"d_model {d}" for d in widths])
    ax.set_ylim(0, 1.22)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("MQAR accuracy (queries)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=len(archs), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("accuracy") is None:
            continue
        key = (r["arch"], r["d_model"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return [
        {"arch": a, "d_model": d, "accuracy": r["accuracy"], "lr": r["lr"], "steps": r["steps"], "params": r["params"]}
        for (a, d), r in sorted(best.items(), key=lambda kv: (list(ARCHS).index(kv[0][0]), kv[0][1]))
    ]


def _common_overrides(args: argparse.Namespace) -> list[str]:
    """The training overrides every point shares (all but the model and the learning rate)."""
    return [
        "task=mqar", f"synthetic.vocab_size={args.vocab_size}", f"synthetic.num_kv_pairs={args.kv_pairs}",
        f"synthetic.eval_examples={args.eval_examples}", f"synthetic.train_examples={args.train_examples}",
        f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}", "train.weight_decay=0.1",
        "train.eval_every=0", "train.save_every=0", "train.save_final=false", "train.keep_last=1",
        "train.resume=never", f"run.seed={args.seed}", f"run.device={args.device}", "log.progress=false",
    ]  # fmt: skip


def _run_point(
    args: argparse.Namespace, arch: str, d: int, lr: str, share: float, end: float, step_s: dict, log=print
) -> dict[str, Any]:
    """Train and score one point within ``share`` seconds: a short run times the steps (once per model
    in ``step_s``), then as many steps as the share allows; the run is stopped at 1.25x the share, or
    at ``end`` (a ``time.time()``) less the time to score it, and scored at that step."""
    from mixlab.configio import load_config
    from mixlab.eval.mqar import evaluate_mqar
    from mixlab.train.export import load_model
    from mixlab.train.loop import resolve_device, train

    def quiet(_m: str) -> None:
        pass

    L, n, V = args.seq_len, args.kv_pairs, args.vocab_size
    work = Path(args.work_dir)
    t0 = time.monotonic()
    base = [*model_overrides(arch, d), *_common_overrides(args), f"train.lr={lr}"]
    row: dict[str, Any] = {"arch": arch, "d_model": d, "lr": lr, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    score_s = 5.0 + args.eval_examples * L * 2e-6  # load, score and export, roughly
    try:
        if (arch, d) not in step_s:  # time a few steps once per model
            cfg = load_config(None, [*base, "train.max_steps=20", "train.warmup_steps=1", "train.export=false",
                                     "train.log_every=1", f"run.dir={work / 'calibrate' / f'{arch}-d{d}-lr{lr}'}"])  # fmt: skip
            train(cfg, log=quiet)
            step_s[(arch, d)] = _step_seconds(Path(cfg.run.dir))
        steps = int((share - (time.monotonic() - t0) - score_s) * 0.9 / step_s[(arch, d)])
        steps = max(args.min_steps, min(args.max_steps, steps))
        run_dir = work / f"{arch}-d{d}-lr{lr}"
        cfg = load_config(None, [*base, f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                                 f"train.log_every={max(1, min(50, steps // 20))}", f"run.dir={run_dir}"])  # fmt: skip
        t1 = time.monotonic()
        # a hard stop at 1.25x the share (the step-time estimate can be off: a shared machine) or at the end
        hard = min(share * 1.25 - (t1 - t0), end - time.time() - score_s)
        with _Deadline(max(hard, 10.0)) as deadline:
            try:
                res = train(cfg, log=quiet)
            except KeyboardInterrupt:
                if not deadline.fired:
                    raise
                raise RuntimeError("the time share ran out before the first training step") from None
        train_s = time.monotonic() - t1
        if deadline.fired and res.status in ("preempted", "interrupted") and res.step > 0:
            row["stopped_by_budget"] = True  # evaluated at its last checkpoint, the schedule cut short
            log(f"  {arch} d{d} lr {lr}: time share spent at step {res.step} of {steps}")
            steps = res.step
        elif not res.ok:
            raise RuntimeError(res.message or res.status)
        step_s[(arch, d)] = train_s / max(steps, 1)  # the measured speed plans the next learning rates
        model, _ = load_model(run_dir, device=resolve_device(args.device))
        acc = evaluate_mqar(model, [(L, n)], vocab_size=V, examples=args.eval_examples)["results"][0]
        row.update(
            steps=steps, params=int(model.num_parameters()), step_ms=1e3 * train_s / max(steps, 1),
            train_s=round(train_s, 1), final_loss=res.losses.get(steps), val_loss=res.val_loss,
            accuracy=acc["accuracy"], sequence_accuracy=acc["sequence_accuracy"],
        )  # fmt: skip
        del model
    except Exception as e:  # a failed point (e.g. out of memory) must not lose the sweep
        row.update(error=f"{type(e).__name__}: {e}")
        log(f"  {arch} d{d} lr {lr}: failed: {row['error']}")
    return row


def _point_command(args: argparse.Namespace, point: tuple[str, int, str], share: float, end: float, out: Path):
    """The command line of a child process that runs one point (``--jobs`` > 1)."""
    arch, d, lr = point
    fwd = {
        "--seq-len": args.seq_len, "--kv-pairs": args.kv_pairs, "--vocab-size": args.vocab_size,
        "--batch-size": args.batch_size, "--max-steps": args.max_steps, "--min-steps": args.min_steps,
        "--eval-examples": args.eval_examples, "--train-examples": args.train_examples, "--device": args.device,
        "--seed": args.seed, "--work-dir": args.work_dir,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "mixlab.eval.mqar_sweep"]
    for k, v in fwd.items():
        cmd += [k, str(v)]
    return [*cmd, "--point", f"{arch}:{d}:{lr}", "--point-share", f"{share:.1f}", "--point-end", f"{end:.1f}",
            "--point-out", str(out)]  # fmt: skip


def _run_parallel(
    args: argparse.Namespace, points: list, jobs: int, deadline: float, end: float, on_row, log=print
) -> None:
    """Run ``points`` as child processes, ``jobs`` at a time; ``on_row(row)`` in this (the only writing)
    process as each finishes. A point launched with ``R`` points left (itself included) gets the time
    left over ``ceil(R / jobs)`` waves; a child still running 60 s past ``end`` is killed."""
    import os
    import subprocess

    logs = Path(args.work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending = list(points)
    running: dict[Any, tuple[tuple[str, int, str], Path, Path, Any]] = {}

    def finish(proc, killed: bool = False) -> None:
        (arch, d, lr), out, log_file, fh = running.pop(proc)
        fh.close()
        if out.is_file():
            row = json.loads(out.read_text())
        else:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
            why = "killed past the sweep's end" if killed else f"exit status {proc.returncode}"
            row = {"arch": arch, "d_model": d, "lr": lr, "error": f"{why}; {log_file}: {' | '.join(tail)}"}
            log(f"  {arch} d{d} lr {lr}: failed: {row['error']}")
        on_row(row)

    try:
        while pending or running:
            while pending and len(running) < jobs:
                left = deadline - time.monotonic()
                share = left / -(-len(pending) // jobs)
                if share < 5:
                    log(f"budget spent: {len(pending)} point(s) not run")
                    pending.clear()
                    break
                point = pending.pop(0)
                name = "{}-d{}-lr{}".format(*point)
                out, log_file = logs / f"{name}.json", logs / f"{name}.log"
                out.unlink(missing_ok=True)
                fh = log_file.open("w")
                proc = subprocess.Popen(
                    _point_command(args, point, share, end, out), stdout=fh, stderr=subprocess.STDOUT, env=env
                )
                running[proc] = (point, out, log_file, fh)
            time.sleep(0.2)
            for proc in list(running):
                if proc.poll() is not None:
                    finish(proc)
                elif time.time() > end + 60:
                    proc.kill()
                    proc.wait()
                    finish(proc, killed=True)
    finally:  # interrupted: stop the children (SIGTERM: each stops at its step's end)
        for proc in running:
            proc.terminate()
        for proc in list(running):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            running[proc][3].close()


def run_sweep(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the sweep described by ``args`` (see :func:`add_arguments`); returns the result document."""
    from mixlab.bench.common import device_slug, environment

    archs, widths, lrs = _csv(args.archs), _csv(args.d_models, int), _csv(args.lrs)
    for a in archs:
        model_overrides(a, 64)  # validates the name
    env = environment()
    if args.device != "auto":
        env["device"] = env["device"] if args.device.startswith("cuda") else "cpu"
    L, n, V = args.seq_len, args.kv_pairs, args.vocab_size
    out_dir = Path(getattr(args, "out_dir", None) or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"mqar-L{L}-kv{n}-{device_slug(env)}{'-' + args.tag if args.tag else ''}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    settings = {
        "seq_len": L, "num_kv_pairs": n, "vocab_size": V, "batch_size": args.batch_size, "seed": args.seed,
        "eval_examples": args.eval_examples, "train_examples": args.train_examples, "n_layers": 2,
        "budget_min": args.budget_min,
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    if json_path.is_file() and not args.fresh:
        old = json.loads(json_path.read_text())
        if {k: v for k, v in old.get("settings", {}).items() if k != "budget_min"} == {
            k: v for k, v in settings.items() if k != "budget_min"
        }:
            rows = [r for r in old.get("rows", []) if r.get("accuracy") is not None]
            if rows:
                log(f"{json_path}: reusing {len(rows)} finished point(s) (--fresh to redo them)")
    done = {(r["arch"], r["d_model"], r["lr"]) for r in rows}
    points = [(a, d, lr) for a in archs for d in widths for lr in lrs if (a, d, lr) not in done]
    cuda = args.device.startswith("cuda") or (args.device == "auto" and env["device"] != "cpu")
    jobs = max(1, min(len(points), args.jobs or (16 if cuda else 1)))
    deadline = time.monotonic() + 60.0 * args.budget_min
    end = time.time() + 60.0 * args.budget_min
    command = env.get("command", "")
    if sys.argv and sys.argv[0].endswith("mqar_sweep.py"):  # run as `python -m mixlab.eval.mqar_sweep`
        command = env["command"] = "python -m mixlab.eval.mqar_sweep " + shlex.join(sys.argv[1:])

    def save() -> list[dict[str, Any]]:
        best = _best(rows)
        doc = {
            "suite": "mqar", "env": env, "command": command, "jobs": jobs, "settings": settings, "rows": rows,
            "best": best,
        }  # fmt: skip
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(json_path)
        if best:
            try:
                _plot(png_path, best, f"MQAR L={L}, {n} key-value pairs, vocab {V}, 2 layers\n{env['device']}")
            except ImportError:
                log("matplotlib is not installed: no PNG (pip install matplotlib)")
        return best

    def on_row(row: dict[str, Any]) -> None:
        rows.append(row)
        if "accuracy" in row:
            loss = f"{row['final_loss']:.3f}" if row.get("final_loss") is not None else "n/a"
            log(f"  {row['arch']:15s} d{row['d_model']:<4d} lr {row['lr']:<6s} {row['steps']:6d} steps in "
                f"{row['train_s']:7.1f}s  loss {loss}  accuracy {row['accuracy']:.3f}")  # fmt: skip
        save()

    log(f"MQAR sweep: {len(points)} point(s) to run within {args.budget_min:g} min on {env['device']}, "
        f"{jobs} at a time; results in {json_path}")  # fmt: skip
    try:
        if jobs > 1:
            _run_parallel(args, points, jobs, deadline, end, on_row, log)
        else:
            step_s: dict[tuple[str, int], float] = {}
            for i, (arch, d, lr) in enumerate(points):
                share = (deadline - time.monotonic()) / (len(points) - i)
                if share < 5:
                    log(f"budget spent: {len(points) - i} point(s) not run")
                    break
                on_row(_run_point(args, arch, d, lr, share, end, step_s, log))
    except KeyboardInterrupt:
        log("interrupted: keeping the finished points")
    best = save()
    return {"json": json_path, "png": png_path, "rows": rows, "best": best}


def _run_one(args: argparse.Namespace) -> int:
    """Child of a ``--jobs`` sweep: run the point ``--point ARCH:D:LR`` and write its row to ``--point-out``."""
    arch, d, lr = args.point.split(":")
    row = _run_point(args, arch, int(d), lr, args.point_share, args.point_end, {})
    tmp = Path(args.point_out + ".tmp")
    tmp.write_text(json.dumps(row, default=str) + "\n")
    tmp.replace(args.point_out)
    return 0


def run(args: argparse.Namespace) -> int:
    from mixlab.bench.common import format_table

    if getattr(args, "point", None):
        return _run_one(args)
    out = run_sweep(args)
    if not out["best"]:
        print("no point finished", file=sys.stderr)
        return 1
    print(f"\nwrote {out['json']} and {out['png']}")
    print("best accuracy over learning rates (MQAR, held-out queries):")
    table = [{**b, "accuracy": f"{b['accuracy']:.3f}", "params": f"{b['params'] / 1e3:.0f}k"} for b in out["best"]]
    print(format_table(table, ["arch", "d_model", "accuracy", "lr", "steps", "params"]))
    failed = [r for r in out["rows"] if "error" in r]
    return 1 if failed and len(failed) == len(out["rows"]) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixlab.eval.mqar_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="where to write the JSON and PNG (default benchmarks/results)")
    add_arguments(parser)
    for flag, kind in (("--point", str), ("--point-share", float), ("--point-end", float), ("--point-out", str)):
        parser.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)  # a --jobs child's point
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
