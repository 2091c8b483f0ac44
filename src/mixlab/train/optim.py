"""AdamW with the usual no-decay groups, and the learning-rate schedule.

Weight decay applies to matrices only: 1-D parameters (norm weights, biases, D, dt biases) and any
parameter flagged ``_no_weight_decay = True`` (A_log, D, dt_bias, ...) get none.

The schedule is a pure function of the step (its only state), so resuming needs nothing but the
step: linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``, then ``cosine`` or
``linear`` decay to ``lr * min_lr_ratio`` at ``max_steps``, or ``constant``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mixlab.config import TrainConfig

__all__ = ["LRSchedule", "build_optimizer", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (matrices) and ``no_decay`` (1-D and ``_no_weight_decay`` params).

    Each group also carries ``names`` (parameter names, in order) for readable checkpoints.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names, "group": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused on CUDA, foreach elsewhere."""
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    kwargs: dict[str, Any] = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


class LRSchedule:
    """``lr(step)`` for the step about to be taken (0-based)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.lr = cfg.lr
        self.min_lr = cfg.lr * cfg.min_lr_ratio
        self.warmup = cfg.warmup_steps
        self.max_steps = cfg.max_steps
        self.kind = cfg.schedule

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        span = max(1, self.max_steps - self.warmup)
        frac = min(1.0, max(0.0, (step - self.warmup) / span))
        if self.kind == "linear":
            return self.lr + (self.min_lr - self.lr) * frac
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` for ``step``; returns it."""
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "min_lr": self.min_lr,
            "warmup": self.warmup,
            "max_steps": self.max_steps,
        }
