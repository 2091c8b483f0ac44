"""Training: the one loop (``train``), optimizer and schedule, checkpoints, metrics, export,
and multi-process training (``parallel``: DDP / FSDP2 wrapping; ``distributed``: process groups,
diagnostics, hang detection, preemption).

from mixlab.configio import load_config
from mixlab.train import train
result = train(load_config(None, ["train.max_steps=100"]))
print(result.run_dir, result.losses[100], result.val_loss)
"""

from mixlab.train.checkpoint import (
    CheckpointError,
    find_resume,
    load_checkpoint,
    read_model_state,
    save_checkpoint,
    verify_checkpoint,
)
from mixlab.train.distributed import DistributedError
from mixlab.train.export import export, load_model
from mixlab.train.loop import RunResult, apply_activation_checkpointing, train
from mixlab.train.metrics import MetricsLogger, read_metrics
from mixlab.train.optim import LRSchedule, build_optimizer, param_groups

__all__ = [
    "CheckpointError",
    "DistributedError",
    "LRSchedule",
    "MetricsLogger",
    "RunResult",
    "apply_activation_checkpointing",
    "build_optimizer",
    "export",
    "find_resume",
    "load_checkpoint",
    "load_model",
    "param_groups",
    "read_metrics",
    "read_model_state",
    "save_checkpoint",
    "train",
    "verify_checkpoint",
]
