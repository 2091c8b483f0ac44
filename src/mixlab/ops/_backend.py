"""Backend selection shared by every op family.

``reference``: step-by-step recurrence (the definition; slow, float64-friendly).
``chunked``: chunkwise-parallel plain PyTorch (any device; the CPU path and the kernels' oracle).
``triton``: Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``, for tests).
``auto``: ``triton`` when the inputs live on CUDA and Triton imports, else ``chunked``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "chunked", "triton")


def probe_once(fn: Callable[[], bool]) -> Callable[[], bool]:
    """Cache a no-argument probe's answer. A compiled graph calls it at trace time and keeps the answer as a
    constant (``torch.compiler.assume_constant_result``), rather than tracing a ``functools.cache`` wrapper,
    which Dynamo warns about on every compiled block."""
    answer: list[bool] = []

    @functools.wraps(fn)
    def probe() -> bool:
        if not answer:
            answer.append(fn())
        return answer[0]

    return torch.compiler.assume_constant_result(probe)


@probe_once
def triton_available() -> bool:
    """True when Triton imports and either CUDA is present or the interpreter is on."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn ``backend`` (possibly ``"auto"``) into a concrete backend for tensor ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "chunked"
    if backend == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); "
            "use backend='chunked' on this device"
        )
    return backend


def plain_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off around the plain-PyTorch backends: they choose their own compute dtype (float32,
    float64 for float64 inputs) and return the input dtype, so autocast's bf16 matmuls must not reach
    inside them."""
    return torch.autocast(device_type=x.device.type, enabled=False)
