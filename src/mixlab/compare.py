"""``mixlab compare``: train a grid of runs that differ only in what is varied, then report.

    mixlab compare --vary model=transformer-tiny,mamba-tiny --vary train.lr=1e-3,1e-4 train.max_steps=200
    mixlab compare -c configs/experiments/architectures.yaml            # scaled down
    mixlab compare -c configs/experiments/architectures.yaml --full     # the full-size experiment

Every run of the grid gets the same base configuration (same seed, data, batch and steps) plus
one combination of the varied values, and trains sequentially in this process through the one
training loop (``mixlab.train.train``); the pseudo-key ``gpus`` (``--vary gpus=1,4``) launches
runs with more than one GPU through ``torchrun`` with ``parallel.strategy=ddp``. Finished runs are
reused (``--rerun`` trains them again). After each run the evaluation (``eval: auto``: ``ppl`` for
text, ``mqar`` for ``task=mqar``, ``synthetic`` for selective copying) is merged into the run's ``eval.json``.

The report (``OUT/report.md`` with PNG plots, and ``OUT/report.html``, one self-contained page
with the plots inlined as base64) shows loss against step and against wall time, tokens/s, peak
GPU memory, parameter counts and the evaluation results, plus ``OUT/summary.json``.

An experiment file is YAML::

    name: architectures
    description: ...
    vary: {model: [transformer-tiny, mamba-tiny]}     # key -> values (one run per combination)
    base: {data: {seq_len: 256}, train: {max_steps: 200}}   # the `mixlab train` config tree
    eval: auto                                          # auto | none | ppl,mqar,...
    full:                                               # what --full changes (same keys)
      vary: {model: [report-transformer-3.5b, report-mamba-3.2b]}
      base: {data: {seq_len: 2048}, train: {max_steps: 1000}}

Command-line ``--vary KEY=...`` replaces the file's values for KEY; ``key=value`` overrides apply to
every run after the file's base.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import gc
import html
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "GridRun",
    "compare",
    "expand_grid",
    "flatten_overrides",
    "load_experiment",
    "parse_vary",
    "summarize_run",
    "write_report",
]

PSEUDO_KEYS = ("gpus",)


@dataclasses.dataclass
class GridRun:
    """One run of the grid: its name, its overrides (base + varied) and the varied values."""

    name: str
    run_dir: Path
    overrides: list[str]
    varied: dict[str, str]
    gpus: int = 1


# ------------------------------------------------------------------ grid


def parse_vary(items: Sequence[str]) -> dict[str, list[str]]:
    """``["model=a,b", "train.lr=1e-3,1e-4"]`` -> ``{"model": ["a", "b"], "train.lr": ["1e-3", "1e-4"]}``.

    A list value in brackets keeps its commas: ``train.betas=[0.9,0.95],[0.9,0.99]``."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--vary {item!r}: expected KEY=V1,V2,... (e.g. model=transformer-tiny,mamba-tiny)")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = [v.strip() for v in re.findall(r"\[[^\]]*\]|[^,]+", raw) if v.strip()]
        if not key or not values:
            raise ValueError(f"--vary {item!r}: needs a key and at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"--vary {item!r}: a value is repeated")
        out[key] = values
    return out


def flatten_overrides(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested config mapping as ``key=value`` overrides (``{"train": {"lr": 1e-3}}`` -> ``train.lr=0.001``)."""
    out = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten_overrides(value, f"{full}."))
        elif isinstance(value, str):
            out.append(f"{full}={value}")
        else:
            out.append(f"{full}={json.dumps(value)}")
    return out


def _slug(varied: dict[str, str]) -> str:
    parts = []
    for key, value in varied.items():
        short = key.rsplit(".", 1)[-1]
        parts.append(value if key == "model" else f"{short}{value}")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts))[:80] or "run"


def expand_grid(vary: dict[str, list[str]], base: Sequence[str], out_dir: str | Path) -> list[GridRun]:
    """Every combination of the varied values (first key slowest), as runs under ``out_dir/runs``."""
    from mixlab.configio import parse_override

    base_keys = {parse_override(o)[0] for o in base}
    clash = sorted(set(vary) & base_keys)
    if clash:
        raise ValueError(
            f"key(s) {', '.join(clash)} are both varied and set in the base; drop them from the base "
            "(the varied values would silently win)"
        )
    keys = list(vary)
    runs, seen = [], set()
    for i, combo in enumerate(itertools.product(*(vary[k] for k in keys)) if keys else [()]):
        varied = dict(zip(keys, combo))
        name = f"{i:02d}-{_slug(varied)}" if keys else "00-base"
        while name in seen:
            name += "_"
        seen.add(name)
        gpus = int(varied.get("gpus", 1))
        if gpus < 1:
            raise ValueError(f"gpus={gpus}: must be >= 1")
        run_dir = Path(out_dir) / "runs" / name
        ov = [*base, *(f"{k}={v}" for k, v in varied.items() if k not in PSEUDO_KEYS)]
        ov.append(f"run.dir={run_dir}")
        if gpus > 1:
            ov.append("parallel.strategy=ddp")
        runs.append(GridRun(name, run_dir, ov, varied, gpus))
    return runs


def load_experiment(path: str | Path, full: bool = False) -> dict[str, Any]:
    """An experiment file as ``{"name", "description", "vary": {key: [str]}, "base": [overrides], "eval"}``;
    ``full`` applies its ``full:`` section (vary keys replaced, base merged)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"experiment file {str(p)!r} does not exist")
    doc = yaml.safe_load(p.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: an experiment file holds a mapping (name, vary, base, eval, full)")
    unknown = set(doc) - {"name", "description", "vary", "base", "eval", "full"}
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {sorted(unknown)}; allowed: name, description, vary, base, eval, full")
    vary = {
        k: [_scalar(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in (doc.get("vary") or {}).items()
    }
    base = dict(doc.get("base") or {})
    if full:
        f = doc.get("full")
        if not f:
            raise ValueError(f"{p} has no 'full:' section; the file's settings are already its full size")
        for k, vs in (f.get("vary") or {}).items():
            vary[k] = [_scalar(v) for v in (vs if isinstance(vs, list) else [vs])]
        base = _deep_merge(base, f.get("base") or {})
    return {
        "name": doc.get("name") or p.stem,
        "description": doc.get("description", ""),
        "vary": vary,
        "base": flatten_overrides(base),
        "eval": str(doc.get("eval", "auto")),
    }


def _scalar(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------ running


def _finished(run_dir: Path, max_steps: int) -> bool:
    from mixlab.train.metrics import read_metrics

    if not (run_dir / "model.safetensors").is_file():
        return False
    steps = [r.get("step", 0) for r in read_metrics(run_dir) if "tokens_per_s" in r]
    return bool(steps) and max(steps) >= max_steps


def _eval_tasks(spec: str, cfg: Any) -> list[str]:
    if spec in ("", "none"):
        return []
    if spec == "auto":
        return {"text": ["ppl"], "mqar": ["mqar"], "selective_copying": ["synthetic"]}.get(cfg.task, [])
    return [t for t in spec.split(",") if t.strip()]


def _train_one(run: GridRun, cfg: Any, log: Callable[[str], None]) -> str:
    """Train one run; returns its status (``completed``, ``diverged``, ``failed: ...``)."""
    if run.gpus > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.gpus}",
            "-m", "mixlab", "train", *run.overrides, "log.progress=false",
        ]  # fmt: skip
        log(f"[{run.name}] {shlex.join(cmd)}")
        proc = subprocess.run(cmd, check=False)
        return "completed" if proc.returncode == 0 else f"failed: torchrun exited with {proc.returncode}"
    import torch

    from mixlab.train.loop import train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        res = train(cfg, log=lambda m: log(f"[{run.name}] {m}"))
    except Exception as e:  # one broken run (e.g. out of memory) must not lose the others
        log(f"[{run.name}] failed: {type(e).__name__}: {e}")
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res.status if res.ok else f"{res.status}: {res.message}"


def compare(
    vary: dict[str, list[str]],
    base: Sequence[str] = (),
    out_dir: str | Path = "compare",
    *,
    eval_spec: str = "auto",
    title: str = "mixlab compare",
    description: str = "",
    rerun: bool = False,
    dry_run: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the grid and write the report; returns ``{"runs": [summary], "report_md", "report_html"}``."""
    from mixlab.config import ConfigError
    from mixlab.configio import load_config

    out = Path(out_dir)
    runs = expand_grid(vary, list(base), out)
    configs = []
    for run in runs:  # validate every configuration before training any
        try:
            configs.append(load_config(None, run.overrides))
        except ConfigError as e:
            raise ConfigError(f"run {run.name} ({', '.join(f'{k}={v}' for k, v in run.varied.items())}): {e}") from None
    log(f"{len(runs)} run(s) under {out / 'runs'}: " + ", ".join(r.name for r in runs))
    if dry_run:
        for run in runs:
            log(f"  {run.name}: mixlab train {shlex.join(run.overrides)}")
        return {"runs": [], "planned": [dataclasses.asdict(r) | {"run_dir": str(r.run_dir)} for r in runs]}
    statuses: dict[str, str] = {}
    for run, cfg in zip(runs, configs):
        if not rerun and _finished(run.run_dir, cfg.train.max_steps):
            log(f"[{run.name}] already finished; reusing it (--rerun trains it again)")
            statuses[run.name] = "completed (reused)"
        else:
            t0 = time.perf_counter()
            statuses[run.name] = _train_one(run, cfg, log)
            log(f"[{run.name}] {statuses[run.name]} in {time.perf_counter() - t0:.1f}s")
        tasks = _eval_tasks(eval_spec, cfg)
        if tasks and statuses[run.name].startswith("completed"):
            from mixlab.eval import evaluate

            try:
                evaluate(run.run_dir, tasks, out=run.run_dir / "eval.json", max_tokens=50_000,
                         log=lambda m, n=run.name: log(f"[{n}] {m}"))  # fmt: skip
            except Exception as e:
                log(f"[{run.name}] evaluation failed: {type(e).__name__}: {e}")
    summaries = [summarize_run(r.run_dir, r.varied, statuses.get(r.name, "")) for r in runs]
    md, page = write_report(out, summaries, title=title, description=description, vary=vary, base=list(base),
                            command=command)  # fmt: skip
    log(f"report: {md}\n        {page}")
    return {"runs": summaries, "report_md": md, "report_html": page}


# ------------------------------------------------------------------ summaries


def _param_count(model_cfg: dict[str, Any]) -> int | None:
    try:
        import torch

        from mixlab.models import LanguageModel
        from mixlab.train.export import model_config_from_dict

        with torch.device("meta"):
            return int(LanguageModel(model_config_from_dict(model_cfg)).num_parameters())
    except Exception:
        return None


def summarize_run(run_dir: str | Path, varied: dict[str, str] | None = None, status: str = "") -> dict[str, Any]:
    """The figures of one run directory: curves from ``metrics.jsonl``, settings from ``config.yaml``,
    evaluation from ``eval.json``."""
    from mixlab.train.metrics import read_metrics

    d = Path(run_dir)
    rows = read_metrics(d)
    train_rows = [r for r in rows if r.get("loss") is not None and "tokens_per_s" in r]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    cfg = (yaml.safe_load((d / "config.yaml").read_text()) or {}) if (d / "config.yaml").is_file() else {}
    ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
    tps = sorted(r["tokens_per_s"] for r in train_rows[1:] or train_rows)  # the first step includes warm-up
    n_tail = max(1, len(train_rows) // 10)
    mem = [r["peak_mem_gb"] for r in train_rows if r.get("peak_mem_gb") is not None]
    model_cfg = cfg.get("model") or {}
    return {
        "name": d.name,
        "run_dir": str(d),
        "varied": dict(varied or {}),
        "status": status or ("completed" if (d / "model.safetensors").is_file() else "incomplete"),
        "model": model_cfg.get("name"),
        "params": _param_count(model_cfg) if model_cfg else None,
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "tokens": train_rows[-1].get("tokens") if train_rows else 0,
        "final_loss": sum(r["loss"] for r in train_rows[-n_tail:]) / n_tail if train_rows else None,
        "val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "tokens_per_s": tps[len(tps) // 2] if tps else None,
        "peak_mem_gb": max(mem) if mem else None,
        "wall_s": train_rows[-1].get("elapsed_s") if train_rows else None,
        # wall time from the start of the first step (data preparation and model build left out)
        "curve": [(r["step"], _since_start(r, train_rows[0]), r["loss"]) for r in train_rows],
        "val_curve": [(r["step"], r["val_loss"]) for r in val_rows],
        "eval": {k: v for k, v in ev.items() if k in ("ppl", "length", "mqar", "niah", "synthetic", "harness")},
    }


def _since_start(row: dict[str, Any], first: dict[str, Any]) -> float | None:
    if row.get("elapsed_s") is None or first.get("elapsed_s") is None:
        return None
    first_step_s = first["tokens"] / first["tokens_per_s"] if first.get("tokens_per_s") and first.get("tokens") else 0.0
    return row["elapsed_s"] - first["elapsed_s"] + first_step_s


def _eval_columns(summaries: list[dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], float | None]]]:
    """(header, getter) of the evaluation figures any run has."""
    cols: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = []

    def has(path: Sequence[str]) -> bool:
        for s in summaries:
            node: Any = s["eval"]
            for p in path:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, (int, float)):
                return True
        return False

    def getter(path: Sequence[str]) -> Callable[[dict[str, Any]], float | None]:
        def get(s: dict[str, Any]) -> float | None:
            node: Any = s["eval"]
            for p in path:
                node = node.get(p) if isinstance(node, dict) else None
            return node if isinstance(node, (int, float)) else None

        return get

    for header, path in (
        ("ppl", ("ppl", "ppl")),
        ("bits/byte", ("ppl", "bits_per_byte")),
        ("loss beyond train len", ("length", "loss_beyond")),
        ("MQAR acc", ("mqar", "accuracy")),
        ("NIAH acc", ("niah", "accuracy")),
        ("task acc", ("synthetic", "accuracy")),
    ):
        if has(path):
            cols.append((header, getter(path)))
    tasks = sorted({t for s in summaries for t in (s["eval"].get("harness") or {})})
    for t in tasks:
        metric = next(
            (m for s in summaries for m, v in (s["eval"]["harness"].get(t) or {}).items()
             if isinstance(v, (int, float)) and "stderr" not in m),
            None,
        )  # fmt: skip
        if metric:
            cols.append((f"{t} {metric.split(',')[0]}", getter(("harness", t, metric))))
    return cols


# ------------------------------------------------------------------ report


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "—"
    if kind == "params":
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
    if kind == "tps":
        return f"{v:,.0f}"
    if kind == "time":
        return f"{v:.1f}s" if v < 600 else f"{v / 60:.1f}min"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _label(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in s["varied"].items()) or s["name"]


def _plots(out: Path, summaries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Write the PNGs; returns ``(file name, caption)`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append((name, caption))

    with_curves = [s for s in summaries if s["curve"]]
    if with_curves:
        for xkey, name, caption in (
            (0, "loss_vs_step.png", "Training loss against optimizer step (dashed markers: validation loss)"),
            (
                1,
                "loss_vs_time.png",
                "Training loss against wall-clock time (from the first step, evaluations included)",
            ),
        ):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for i, s in enumerate(with_curves):
                c = colors[i % len(colors)]
                pts = [(p[xkey], p[2]) for p in s["curve"] if p[xkey] is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, label=_label(s), lw=1.4)
                if xkey == 0 and s["val_curve"]:
                    ax.plot([p[0] for p in s["val_curve"]], [p[1] for p in s["val_curve"]], "o--", color=c, ms=4)
            ax.set_xlabel("step" if xkey == 0 else "wall time since the first step (s)")
            ax.set_ylabel("loss (nats/token)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, name, caption)

    def bars(values: list[float | None], name: str, ylabel: str, caption: str) -> None:
        pairs = [(_label(s), v) for s, v in zip(summaries, values) if v is not None]
        if not pairs:
            return
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(pairs) + 2), 4))
        ax.bar(range(len(pairs)), [v for _, v in pairs], color=[colors[i % len(colors)] for i in range(len(pairs))])
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([p[0] for p in pairs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        save(fig, name, caption)

    bars(
        [s["tokens_per_s"] for s in summaries],
        "tokens_per_s.png",
        "tokens/s",
        "Training throughput (median over steps)",
    )
    bars([s["peak_mem_gb"] for s in summaries], "peak_memory.png", "GB", "Peak GPU memory allocated in training")
    bars([s["params"] for s in summaries], "params.png", "parameters", "Parameter count (tied weights once)")
    for header, get in _eval_columns(summaries):
        slug = re.sub(r"[^a-z0-9]+", "_", header.lower()).strip("_")
        bars([get(s) for s in summaries], f"eval_{slug}.png", header, f"Evaluation: {header}")
    curves = [s for s in summaries if isinstance(s["eval"].get("length"), dict) and s["eval"]["length"].get("buckets")]
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, s in enumerate(curves):
            b = s["eval"]["length"]["buckets"]
            ax.plot([(x["start"] + x["end"]) / 2 for x in b], [x["loss"] for x in b], "o-", ms=3,
                    color=colors[i % len(colors)], label=_label(s))  # fmt: skip
        ax.axvline(curves[0]["eval"]["length"]["train_len"], color="grey", ls=":", label="training length")
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "length_curve.png", "Held-out loss by position, up to 4x the training length")
    return made


def _table(summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = list(dict.fromkeys(k for s in summaries for k in s["varied"]))
    eval_cols = _eval_columns(summaries)
    head = [*keys, "params", "steps", "final train loss", "val loss", "tokens/s", "peak mem (GB)", "wall time"]
    head += [h for h, _ in eval_cols] + ["status"]
    rows = []
    for s in summaries:
        rows.append(
            [s["varied"].get(k, "") for k in keys]
            + [
                _fmt(s["params"], "params"),
                str(s["steps"]),
                _fmt(s["final_loss"]),
                _fmt(s["val_loss"]),
                _fmt(s["tokens_per_s"], "tps"),
                _fmt(s["peak_mem_gb"]),
                _fmt(s["wall_s"], "time"),
            ]
            + [_fmt(get(s)) for _, get in eval_cols]
            + [s["status"]]
        )
    return head, rows


def write_report(
    out_dir: str | Path,
    summaries: list[dict[str, Any]],
    *,
    title: str = "mixlab compare",
    description: str = "",
    vary: dict[str, list[str]] | None = None,
    base: list[str] | None = None,
    command: str = "",
) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs), ``report.html`` (self-contained) and ``summary.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, summaries)
    head, rows = _table(summaries)
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    same = "same seed, data, batch, sequence length and steps unless varied"
    # the effective value of each key: later overrides (command line) replace the file's base
    base = list({b.split("=", 1)[0]: b for b in (base or [])}.values())
    setting = "\n".join(f"- `{b}`" for b in base) or "- (defaults)"
    varied = "\n".join(f"- `{k}`: {', '.join(f'`{v}`' for v in vs)}" for k, vs in (vary or {}).items()) or "- nothing"

    md = [f"# {title}", "", f"{description}".strip(), "", f"Generated {date}. {len(summaries)} run(s); {same}.", ""]
    if command:
        md += ["Command:", "", "```", command, "```", ""]
    md += ["## Setting", "", "Varied:", "", varied, "", "Shared by every run:", "", setting, ""]
    md += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    md += ["", "Final train loss: mean over the last 10% of logged steps. tokens/s: median over steps after the first."]
    md += [""]
    for name, caption in plots:
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    def esc(x: str) -> str:
        return html.escape(x, quote=True)

    imgs = []
    for name, caption in plots:
        data = base64.b64encode((out / name).read_bytes()).decode()
        imgs.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}"><figcaption>{esc(caption)}'
                    "</figcaption></figure>")  # fmt: skip
    table = (
        "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        + "</tbody></table>"
    )  # fmt: skip
    css = (
        "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;"
        "color:#222;padding:0 1rem}table{border-collapse:collapse;font-size:.85rem;margin:1rem 0}"
        "th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1.5rem 0}"
        "figcaption{color:#555;font-size:.9rem}code,pre{background:#f6f6f6;padding:.1rem .3rem}"
        "pre{white-space:pre-wrap;word-break:break-all}"
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{css}</style></head>
<body><h1>{esc(title)}</h1><p>{esc(description)}</p>
<p>Generated {esc(date)}. {len(summaries)} run(s); {esc(same)}.</p>
{f"<pre>{esc(command)}</pre>" if command else ""}
<h2>Setting</h2><p>Varied:</p><ul>{"".join(f"<li><code>{esc(k)}</code>: {esc(', '.join(vs))}</li>" for k, vs in (vary or {}).items())}</ul>
<p>Shared by every run:</p><ul>{"".join(f"<li><code>{esc(b)}</code></li>" for b in base)}</ul>
<h2>Results</h2>{table}
<p>Final train loss: mean over the last 10% of logged steps. tokens/s: median over steps after the first.</p>
{"".join(imgs)}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page)
    clean = [{k: v for k, v in s.items()} for s in summaries]
    (out / "summary.json").write_text(json.dumps({"title": title, "date": date, "vary": vary, "base": base,
                                                  "runs": clean}, indent=2, default=_json_default) + "\n")  # fmt: skip
    return md_path, html_path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)
