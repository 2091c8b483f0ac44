"""The contract every sequence mixer implements.

A mixer maps ``x [B, T, d_model] -> [B, T, d_model]``. Decoding: ``cache = layer.init_cache(batch,
max_len, device, dtype)`` allocates the layer's state; ``layer(x, cache=cache)`` consumes any number
of new tokens (a prefill of any length, or one-token steps), updates ``cache`` in place and returns
exactly what a full forward over the whole sequence would have returned for those positions.

Parameter init: a mixer's ``reset_parameters()`` initialises its own special parameters (A_log,
dt biases, D, convs, norms) and is safe to call after ``to_empty()`` from the meta device.
The model (``mixlab.models.LanguageModel.init_weights``) initialises plain Linear/Embedding weights
first and then calls every module's ``reset_parameters()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Mixer(nn.Module):
    """Base class of sequence mixers (attention, Mamba, Mamba2, DeltaNet, Gated DeltaNet)."""

    #: Names of the Linear submodules that write into the residual stream (scaled by depth at init).
    residual_out_proj: tuple[str, ...] = ("out_proj",)

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        raise NotImplementedError

    def reset_parameters(self) -> None:  # pragma: no cover - overridden where needed
        pass
