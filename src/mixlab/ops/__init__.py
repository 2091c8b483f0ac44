"""The math of sequence mixing. Every op family has ``reference``, ``chunked`` and ``triton``
backends behind one function; ``backend="auto"`` picks ``triton`` on CUDA, else ``chunked``."""

from ._backend import BACKENDS, resolve_backend, triton_available
from .attention import ATTENTION_BACKENDS, apply_rope, attention, attention_mask, rope_cos_sin, rotate_half
from .conv import causal_conv1d
from .delta_rule import delta_rule
from .loss import linear_cross_entropy
from .norm import gated_rms_norm, rms_norm
from .selective_scan import selective_scan
from .ssd import ssd

__all__ = [
    "ATTENTION_BACKENDS",
    "BACKENDS",
    "apply_rope",
    "attention",
    "attention_mask",
    "causal_conv1d",
    "delta_rule",
    "gated_rms_norm",
    "linear_cross_entropy",
    "resolve_backend",
    "rms_norm",
    "rope_cos_sin",
    "rotate_half",
    "selective_scan",
    "ssd",
    "triton_available",
]
