"""Causal depthwise short convolution (the ``d_conv``/``conv_size`` conv of every linear mixer).

``causal_conv1d(x, weight, ...)``: x ``[B, T, C]``, weight ``[C, W]``, bias ``[C]``.
``y[:, t, c] = act(bias[c] + sum_{i<W} weight[c, i] * x[:, t - (W-1) + i, c])`` with the inputs before
the sequence taken from ``initial_state`` ``[B, C, W-1]`` (zeros when None). The final state is
the last ``W-1`` inputs ``[B, C, W-1]`` (the decode cache); a decode step is just a call with T=1.
"""

from __future__ import annotations

from .reference import causal_conv1d

__all__ = ["causal_conv1d"]
