"""Model-side parallelism: the loss module, activation checkpointing, per-block compile, DDP and FSDP2.

Everything here works on the model from the outside; parameter names (and so checkpoints and
exports) are the same for ``none``, ``ddp`` and ``fsdp``.

:class:`LossModule` puts the whole loss (blocks, final norm, the chunked LM-head cross-entropy)
inside one ``forward``, so DDP's reducer and FSDP's hooks see every use of every parameter,
including the LM head that the memory-lean loss applies outside ``LanguageModel.forward``.

:func:`parallelize` applies, in this order: activation checkpointing per block → ``torch.compile``
per block → the strategy. ``ddp`` wraps the loss module in ``DistributedDataParallel``;
``fsdp`` calls ``fully_shard`` on every block and then on the loss module (the root: embedding,
final norm, LM head), with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32,
cast_forward_inputs=False)`` when training in bf16 on CUDA (the float32 residual stream stays
float32) and float32 otherwise. :meth:`Parallel.grad_sync` skips the gradient all-reduce /
reduce-scatter on all but the last micro-batch of an accumulated step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixlab.config import ParallelConfig, ac_selective_arg

__all__ = [
    "LossModule",
    "Parallel",
    "apply_activation_checkpointing",
    "apply_state_keeping",
    "broadcast_parameters",
    "checkpointed_blocks",
    "clip_for_fused_step",
    "clip_grad_norm",
    "full_model_state",
    "lm_loss",
    "parallelize",
    "tied_aliases",
    "training_allocator",
]


def lm_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    amp_dtype: torch.dtype | None,
    all_scored: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``model`` (a ``LanguageModel``) on ``inputs [B, T]`` against ``targets [B, T]``
    (-100 = not scored), with the chunked LM head (no ``[B, T, vocab]`` logits); bf16 autocast when
    ``amp_dtype`` is given. ``all_scored``: the targets are a token stream (none is -100), so the loss
    skips its host-side count of scored rows (``linear_cross_entropy(compact=False)``, no device sync)."""
    from mixlab.ops.loss import linear_cross_entropy

    device_type = inputs.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        hidden = model.forward_hidden(inputs)
    weight = model.lm_head.weight
    if amp_dtype is not None:
        hidden = hidden.to(amp_dtype)  # the LM head in bf16 too, as under autocast
    elif hidden.dtype != weight.dtype:  # FSDP bf16 parameters without autocast
        hidden = hidden.to(weight.dtype)
    return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), compact=False if all_scored else None)


class LossModule(nn.Module):
    """``forward(inputs [B, T], targets [B, T]) -> scalar loss`` around a ``LanguageModel``.

    Holds the model as ``.model`` (so its parameter names gain a ``model.`` prefix here; checkpoints
    always use the bare model's names)."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, all_scored: bool = False) -> torch.Tensor:
        return lm_loss(self.model, inputs, targets, self.amp_dtype, all_scored)


#: the CUDA caching allocator setting training runs take unless the user set PYTORCH_CUDA_ALLOC_CONF
TRAINING_ALLOC_CONF = "expandable_segments:True"


def training_allocator() -> bool:
    """Let training use the CUDA allocator's expandable segments (``PYTORCH_CUDA_ALLOC_CONF``), unless the
    variable is set already: near the memory limit the cached blocks otherwise fragment, and the allocator
    frees and re-allocates them, synchronising the device (PyTorch's advice for memory-bound training). Takes
    effect only before the process's first CUDA allocation (the trainer and ``mixlab bench train`` call it
    first); returns whether it set the variable."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = TRAINING_ALLOC_CONF
    return True


# ------------------------------------------------------------------ activation checkpointing


def checkpointed_blocks(mode: str, n_blocks: int) -> list[int]:
    """Indices of the blocks that activation checkpointing ``mode`` recomputes, out of ``n_blocks``.

    ``none``; ``full`` (all); ``selective`` (every other block: 0, 2, 4, ...); ``selective:N`` (N
    blocks, an integer, spread evenly over the depth; clamped to ``n_blocks``); ``selective:F``
    (a fraction 0 <= F < 1 of the blocks, rounded up). Each checkpointed block keeps only its input
    for backward, so memory falls about linearly with N while the recompute grows with N.
    """
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_blocks))
    if mode == "selective":
        return list(range(0, n_blocks, 2))
    value = ac_selective_arg(mode) or 0.0  # N or F; a ValueError naming the allowed forms for anything else
    n = min(n_blocks, int(value) if value >= 1 else math.ceil(value * n_blocks))
    # n blocks at evenly spaced positions (the middle of n equal spans of the depth)
    return sorted({min(n_blocks - 1, int((j + 0.5) * n_blocks / n)) for j in range(n)}) if n else []


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> int:
    """Recompute block activations in backward (``torch.utils.checkpoint``, non-reentrant).

    ``mode``: ``full`` (every block), ``selective`` (every other block: 0, 2, 4, ...),
    ``selective:N`` / ``selective:F`` (N blocks, or a fraction F of them, spread evenly: see
    :func:`checkpointed_blocks`) or ``none``. Applied from outside by wrapping each chosen block's
    ``forward``; parameter names and the state dict are unchanged. Blocks called with a decode cache
    or without grad run normally. Returns the number of wrapped blocks."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .layers; cannot apply activation checkpointing")
    chosen = checkpointed_blocks(mode, len(blocks))
    for i in chosen:
        block = blocks[i]
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            uses_cache = (len(args) > 1 and args[1] is not None) or kwargs.get("cache") is not None
            if not torch.is_grad_enabled() or uses_cache:
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block.activation_checkpointing = True  # read by LanguageModel.forward_hidden
    return len(chosen)


def apply_state_keeping(model: nn.Module, keep: bool = True) -> int:
    """Let the delta-rule mixers of blocks that are not checkpointed keep their chunk states from forward to
    backward (:attr:`mixlab.layers.deltanet.DeltaNet.keep_states`) where that saves time (``keeping_states_pays``:
    key head dims above 128): faster, more memory. A checkpointed block runs its forward again in backward, so its
    states would be kept for nothing. Returns the number of mixers that keep them."""
    n = 0
    for block in getattr(model, "layers", ()):
        mixer = getattr(block, "mixer", None)
        if mixer is None or not hasattr(type(mixer), "keep_states"):
            continue
        ckpt = getattr(block, "activation_checkpointing", False)
        mixer.keep_states = bool(keep) and not ckpt and mixer.keeping_states_pays()
        n += int(mixer.keep_states)
    return n


# ------------------------------------------------------------------ helpers


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias name: first name}`` of parameters and buffers registered under several names (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owner = first.setdefault(id(t), name)
        if owner != name:
            out[name] = owner
    return out


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (identical initialisation
    whatever each device's random generator did)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        dist.broadcast(t.data, src=src)


def clip_grad_norm(
    params: list[torch.Tensor], max_norm: float, optimizer: torch.optim.Optimizer | None = None
) -> float:
    """``clip_grad_norm_`` that also accepts FSDP's DTensor gradients; returns the global norm before clipping.

    With a fused ``optimizer`` (and no DTensor parameters) the gradients are not rescaled here: the clip factor
    goes to the optimizer as its ``grad_scale`` (the fused kernels divide every gradient by it on the fly, as for
    a ``GradScaler``), which saves a read and write of every gradient. The caller then calls ``optimizer.step()``
    or skips the step."""
    # not for FSDP's DTensor parameters: the fused step would mix a plain grad_scale tensor with DTensors
    fold = optimizer is not None and optimizer.defaults.get("fused") and not any(_is_dtensor(p) for p in params)
    if not fold:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    full = getattr(norm, "full_tensor", None)
    if callable(full):
        norm = full()
    if fold:
        _set_clip_scale(optimizer, norm, max_norm)
        optimizer.found_inf = None  # type: ignore[attr-defined]  # the caller skips a non-finite step itself
    return float(norm)


def _set_clip_scale(optimizer: torch.optim.Optimizer, norm: torch.Tensor, max_norm: float) -> None:
    # clip_grad_norm_'s factor max_norm / (norm + 1e-6), capped at 1, as a divisor
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # type: ignore[attr-defined]


def clip_for_fused_step(
    params: list[torch.Tensor], max_norm: float, optimizer: torch.optim.Optimizer, loss: torch.Tensor
) -> torch.Tensor | None:
    """Prepare a fused optimizer's next step with nothing read back to the host, so that the step can be queued
    behind the backward: returns the global gradient norm as a device tensor.

    Sets the optimizer's ``grad_scale`` (the clip, as :func:`clip_grad_norm` does) and ``found_inf``: 1 when the
    norm or ``loss`` (a device scalar, the same on every rank) is not finite, and the fused kernels then leave the
    parameters and their state alone, the step count included. Returns None, setting nothing, for an optimizer
    that is not fused or DTensor parameters: call :func:`clip_grad_norm` and skip a bad step on the host then."""
    if not optimizer.defaults.get("fused") or any(_is_dtensor(p) for p in params):
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    _set_clip_scale(optimizer, norm, max_norm)
    bad = ~(torch.isfinite(norm) & torch.isfinite(loss))
    optimizer.found_inf = bad.to(torch.float32).reshape(())  # type: ignore[attr-defined]
    return norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters and persistent buffers as CPU tensors on rank 0 (an empty dict on
    the other ranks when sharded), tied weights stored once. A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mixlab.train.checkpoint import model_state_dict

    if not _is_sharded(model):
        return model_state_dict(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    aliases = tied_aliases(model)
    return {k: v.contiguous() for k, v in state.items() if k not in aliases}


def _is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return isinstance(t, DTensor)


# ------------------------------------------------------------------ wrapping


@dataclass
class Parallel:
    """A model ready to train: ``runner(inputs, targets) -> loss`` (the strategy's wrapper around a
    :class:`LossModule`) and ``model``, the bare ``LanguageModel`` (parameter names, checkpoints, eval)."""

    model: nn.Module
    runner: nn.Module
    strategy: str
    kept_states: int = 0  # delta-rule layers that keep their chunk states for backward (apply_state_keeping)

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Run one micro-batch's forward and backward; ``enabled=False`` keeps its gradients local
        (accumulated) instead of all-reducing / reduce-scattering them."""
        if self.strategy == "ddp" and not enabled:
            with self.runner.no_sync():  # type: ignore[operator]
                yield
            return
        if self.strategy == "fsdp":
            self.runner.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        yield


def parallelize(
    model: nn.Module,
    pcfg: ParallelConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    activation_checkpointing: str = "none",
    compile_blocks: bool = False,
    keep_states: bool = False,
) -> Parallel:
    """Apply activation checkpointing (and ``keep_states``: :func:`apply_state_keeping`), per-block compile and
    ``pcfg.strategy`` to an initialised model (on ``device``, identical on every rank). See the module docstring
    for the order and policies."""
    apply_activation_checkpointing(model, activation_checkpointing)
    kept = apply_state_keeping(model, keep_states)
    if compile_blocks:
        for block in model.layers:  # type: ignore[union-attr]
            block.compile()
    runner: nn.Module = LossModule(model, amp_dtype)
    if pcfg.strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers (RoPE tables) are deterministic and never change: no per-forward buffer broadcast.
        sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        runner = DistributedDataParallel(
            runner,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **{sync: False},
        )
    elif pcfg.strategy == "fsdp":
        runner = _fully_shard(model, runner, device, amp_dtype, pcfg.fsdp_reshard_after_forward)
    elif pcfg.strategy != "none":
        raise ValueError(f"unknown parallel.strategy {pcfg.strategy!r}")
    return Parallel(model=model, runner=runner, strategy=pcfg.strategy, kept_states=kept)


def _fully_shard(
    model: nn.Module, root: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, reshard: bool
) -> nn.Module:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6 exposes it under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # type: ignore[no-redef]

    kwargs: dict[str, Any] = {}
    if amp_dtype is not None and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=amp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    blocks = list(model.layers)  # type: ignore[union-attr]
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(root, reshard_after_forward=reshard, **kwargs)
    return root
