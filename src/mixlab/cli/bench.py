"""``mixlab bench SUITE``: measured figures, stored under benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib

#: suite -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``
SUITES: dict[str, tuple[str, str]] = {
    "ops-cpu": ("mixlab.bench.ops_cpu", "chunked vs reference ops, forward+backward, on the CPU"),
    "kernels": ("mixlab.bench.kernels", "Triton kernels vs peers at 65,536 tokens per call (GPU)"),
    "kernels-mamba": (
        "mixlab.bench.cases_mamba",
        "Mamba scan, causal conv, (gated) RMSNorm and chunked loss vs their floors (GPU)",
    ),
    "train": ("mixlab.bench.train", "training throughput, MFU and memory of the model presets (GPU)"),
    "scaling": ("mixlab.bench.scaling", "DDP / FSDP tokens/s and scaling efficiency on 1, 2, 4, 8 GPUs (torchrun)"),
    "decode": ("mixlab.bench.decode", "prefill and per-token decode latency and memory (GPU)"),
    "mqar": ("mixlab.eval.mqar_sweep", "MQAR recall: architectures x widths x learning rates within a time budget"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, (module, help_text) in SUITES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_suite_module=module)
        p.add_argument("--out-dir", default=None, help="where to write the JSON (default benchmarks/results)")
        mod.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._suite_module).run(args) or 0)
