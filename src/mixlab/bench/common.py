"""Shared benchmark plumbing: environment facts, timing, and result files.

Every suite stores ``benchmarks/results/<suite>-<device-slug>-<date>.json`` holding the device name,
torch/triton/python versions, the date, the exact command line and a list of result rows.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path("benchmarks/results")


def environment() -> dict[str, Any]:
    """Device and software facts recorded with every result."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": _command_line(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def _command_line() -> str:
    """The command as a user would type it (``mixlab ...`` for the console script or ``python -m mixlab``)."""
    argv = sys.argv or [""]
    if argv[0].endswith(("mixlab", "__main__.py")):
        return " ".join(["mixlab", *argv[1:]])
    return " ".join(argv)


def device_slug(env: dict[str, Any]) -> str:
    name = str(env.get("device", "unknown")).lower()
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def save_results(
    suite: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None, out_dir: str | Path | None = None
) -> Path:
    """Write ``{env, rows, **extra}`` as JSON under ``out_dir`` (default ``benchmarks/results``)."""
    env = environment()
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}-{device_slug(env)}-{env['date'][:10]}.json"
    payload = {"suite": suite, "env": env, **(extra or {}), "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def pyplot(suite: str) -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"bench {suite}: matplotlib is not installed (pip install 'mixlab[plot]'); no plot written")
        return None
    return plt


def cuda_sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (``torch.OutOfMemoryError`` or an allocator message)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next point starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
