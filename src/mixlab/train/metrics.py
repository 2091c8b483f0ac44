"""Training metrics: ``metrics.jsonl`` in the run directory, plus optional TensorBoard / W&B sinks.

One JSON object per line. Training rows carry ``step`` (optimizer steps completed), ``loss`` (that
step's mean token loss), ``loss_avg`` (mean over the steps since the previous row), ``lr``,
``grad_norm`` (before clipping), ``tokens_per_s`` (all ranks, excluding eval and checkpoint time),
``tokens`` (seen so far), ``elapsed_s``, and on GPUs ``peak_mem_gb`` and ``mfu``. Evaluation rows
carry ``step``, ``val_loss``, ``val_ppl``. Other events (``event``: resume, skip, diverged) are rows
too; readers filter on the keys they need (:func:`read_metrics`).

On resume from step ``k`` the rows after ``k`` are dropped from ``metrics.jsonl`` (they will be
logged again) and the previous file is kept as ``metrics.before-resume-<k>.jsonl``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixlab.config import LogConfig, ModelConfig

__all__ = ["MetricsLogger", "device_peak_flops", "flops_per_token", "read_metrics"]

METRICS_FILE = "metrics.jsonl"

#: dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU
_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12))


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (``override_tflops`` wins); None when unknown (CPU, other GPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16 if k in name), None)


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6 x (non-embedding params + LM head) plus the
    attention score/value matmuls (6 · T_eff · heads · head_dim per attention layer, causal-halved).
    The mixers' recurrent state updates are not counted, so MFU slightly understates linear mixers."""
    n = model.num_parameters(exclude_embeddings=True) + cfg.vocab_size * cfg.d_model  # type: ignore[operator]
    flops = 6.0 * n
    att = cfg.attention
    head_dim = att.head_dim or cfg.d_model // att.n_heads
    for letter in cfg.layer_types:
        if letter in ("A", "S"):
            t_eff = min(seq_len, att.window) if letter == "S" else seq_len
            flops += 6.0 * t_eff * att.n_heads * head_dim
    return flops


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of ``run_dir/metrics.jsonl`` (damaged trailing lines ignored)."""
    p = Path(run_dir) / METRICS_FILE
    rows = []
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsLogger:
    """Appends rows to ``metrics.jsonl`` and mirrors numeric values to the enabled sinks."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LogConfig,
        config_dict: dict[str, Any] | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
        log=print,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:
                log("log.tensorboard=true needs tensorboard: pip install tensorboard; continuing without it")
        if cfg.wandb:
            try:
                import wandb

                self._wandb = wandb.init(
                    project=cfg.wandb_project,
                    name=self.run_dir.name,
                    dir=str(self.run_dir),
                    mode=cfg.wandb_mode,
                    config=config_dict,
                    resume="allow",
                    id=self.run_dir.name.replace("/", "_"),
                )
            except ImportError:
                log("log.wandb=true needs wandb: pip install wandb; continuing without it")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        if len(keep) != len(lines):
            shutil.copyfile(self.path, self.run_dir / f"metrics.before-resume-{step}.jsonl")
            self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        step = row.get("step")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None and step is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and step is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
