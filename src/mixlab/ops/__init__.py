"""The math of sequence mixing. Every op family has ``reference``, ``chunked`` and ``triton``
backends behind one function; ``backend="auto"`` picks ``triton`` on CUDA, else ``chunked``."""

from ._backend import BACKENDS, resolve_backend, triton_available
from .conv import causal_conv1d
from .delta_rule import delta_rule
from .norm import gated_rms_norm, rms_norm
from .selective_scan import selective_scan
from .ssd import ssd

__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "delta_rule",
    "gated_rms_norm",
    "resolve_backend",
    "rms_norm",
    "selective_scan",
    "ssd",
    "triton_available",
]
