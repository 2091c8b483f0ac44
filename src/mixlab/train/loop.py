"""The one training loop, for every architecture.

``train(config)``: resolve the run directory → tokenizer and token shards (prepared once, then
reused) → model built on the meta device, materialised and initialised → optional activation
checkpointing / ``torch.compile`` per block → AdamW + schedule → resume from the newest intact
checkpoint (``train.resume=auto``) → for each step: the loader's batch for that step, forward and
backward over micro-batches (gradient accumulation), clip, step → metrics → eval every
``train.eval_every`` → checkpoint every ``train.save_every`` → export at the end.

Precision: float32 master weights; bf16 autocast on CUDA (``train.precision=auto``), float32 on
the CPU. A non-finite loss or gradient norm skips the step (no update, the batch is consumed);
``train.max_bad_steps`` consecutive ones stop the run, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixlab.config import Config, ConfigError
from mixlab.configio import config_to_dict, save_config
from mixlab.data.loader import TrainLoader, eval_batches
from mixlab.data.shards import prepare_shards
from mixlab.data.synthetic import LabeledBatch, SyntheticLoader
from mixlab.data.tokenizer import load_tokenizer
from mixlab.train.checkpoint import CheckpointError, find_resume, load_checkpoint, save_checkpoint, verify_checkpoint
from mixlab.train.export import export
from mixlab.train.metrics import MetricsLogger, device_peak_flops, flops_per_token
from mixlab.train.optim import LRSchedule, build_optimizer

__all__ = ["RunResult", "TrainingDiverged", "apply_activation_checkpointing", "resolve_device", "train"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


@dataclass
class RunResult:
    """What a run did. ``status``: ``completed`` | ``diverged`` | ``interrupted``."""

    run_dir: Path
    status: str
    step: int
    start_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss of every step
    val_loss: float | None = None
    checkpoint: Path | None = None
    exported: Path | None = None
    tokens: int = 0
    bad_steps: int = 0
    elapsed_s: float = 0.0
    message: str = ""
    config: Config | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


# ------------------------------------------------------------------ helpers


def resolve_device(spec: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={spec!r} but CUDA is not available; use run.device=auto or cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward (``torch.utils.checkpoint``, non-reentrant).

    Applied from outside the model by wrapping each block's ``forward``; parameter names and the
    state dict are unchanged. Blocks called with a decode cache or without grad run normally.
    Returns the number of wrapped blocks."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .layers; cannot apply activation checkpointing")
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            uses_cache = (len(args) > 1 and args[1] is not None) or kwargs.get("cache") is not None
            if not torch.is_grad_enabled() or uses_cache:
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def _compute_loss(model: nn.Module, tokens: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens [B, T+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``),
    or of a synthetic task's ``LabeledBatch`` (inputs and labels ``[B, T]``, -100 = not scored)."""
    from mixlab.ops.loss import linear_cross_entropy

    if isinstance(tokens, LabeledBatch):
        inputs, targets = tokens.inputs, tokens.labels
    else:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
    device_type = tokens.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        hidden = model.forward_hidden(inputs)
    if amp_dtype is not None:
        hidden = hidden.to(amp_dtype)  # the LM head in bf16 too, as under autocast
    return linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten())


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _prepare_config(config: Config) -> tuple[Config, Any]:
    """Fill in what the config leaves open: run name/dir and the model's vocabulary size."""
    tok = load_tokenizer(config.data.tokenizer)
    model_cfg = config.model
    policy, m = config.data.model_vocab, config.data.vocab_multiple
    vocab = tok.vocab_size if config.task == "text" else config.synthetic.vocab_size
    fitted = int(math.ceil(vocab / m) * m)
    if policy == "fit" or (policy == "grow" and model_cfg.vocab_size < vocab):
        model_cfg = dataclasses.replace(model_cfg, vocab_size=fitted)
    elif model_cfg.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's (or synthetic task's) vocabulary "
            f"({vocab}); raise it or set data.model_vocab=fit"
        )
    run = config.run
    name = run.name or model_cfg.name or "run"
    run_dir = run.dir or os.path.join("runs", f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    run = dataclasses.replace(run, name=name, dir=run_dir)
    return dataclasses.replace(config, model=model_cfg, run=run), tok


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------ the loop


def train(config: Config, log=None) -> RunResult:
    """Train ``config`` (see the module docstring); returns a :class:`RunResult`.

    ``log``: a ``print``-like function for progress messages (default: print, or tqdm.write
    while the progress bar is shown)."""
    from tqdm.auto import tqdm

    from mixlab.models import build_model

    t_start = time.perf_counter()
    say = log or print
    if config.parallel.strategy != "none":
        raise ConfigError(
            f"parallel.strategy={config.parallel.strategy!r} is not implemented yet; use parallel.strategy=none"
        )
    rank, world = _world()
    device = resolve_device(config.run.device)
    amp_dtype = _amp_dtype(config.train.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg, tok = _prepare_config(config)
    tc, dc = cfg.train, cfg.data
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)

    # data: the text corpus, or a synthetic task's labeled batches (task=mqar | selective_copying)
    loader: TrainLoader | SyntheticLoader
    if cfg.task != "text":
        loader = SyntheticLoader(cfg.task, cfg.synthetic, dc.seq_len, tc.batch_size, cfg.run.seed, rank, world)
        val = loader.eval_batches()
        data_desc = f"synthetic task {cfg.task} ({cfg.synthetic.eval_examples} held-out sequences)"
    else:
        shards = prepare_shards(dc, tokenizer=tok, log=say)
        if not shards.train:
            raise ValueError(f"data.source {dc.sources} gave no training tokens")
        loader = TrainLoader(shards.train, dc.seq_len, tc.batch_size, seed=cfg.run.seed, rank=rank, world_size=world)
        val = eval_batches(shards.val, dc.seq_len, loader.local_batch_size, tc.eval_batches, rank, world)
        if not val:
            say(f"note: the held-out split ({shards.val_tokens} tokens) is shorter than one window; no evaluation")
        data_desc = f"data {shards.train_tokens:,} train / {shards.val_tokens:,} val tokens"
    micro = tc.micro_batch_size or loader.local_batch_size
    if loader.local_batch_size % micro:
        raise ConfigError(
            f"the per-rank batch {loader.local_batch_size} (train.batch_size / world size) must be a multiple of "
            f"train.micro_batch_size={micro}"
        )
    accum = loader.local_batch_size // micro

    # model and optimizer
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % (1 << 32))
    model = build_model(cfg.model, device=device, dtype=torch.float32)
    n_params = model.num_parameters()
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        for block in model.layers:
            block.compile()
    optimizer = build_optimizer(model, tc)
    schedule = LRSchedule(tc)

    # resume
    start_step, tokens_seen, bad_total = 0, 0, 0
    resumed_from: Path | None = None
    if tc.resume != "never":
        found: tuple[Path, dict] | None
        if tc.resume == "auto":
            found = find_resume(ckpt_root, log=say)
        else:
            try:
                found = (Path(tc.resume), verify_checkpoint(tc.resume))
            except CheckpointError as e:
                raise CheckpointError(f"train.resume={tc.resume!r}: {e}") from None
        if found is not None:
            resumed_from, doc = found
            try:
                load_checkpoint(resumed_from, model, optimizer, doc=doc)
            except CheckpointError as e:
                raise CheckpointError(
                    f"cannot resume from {resumed_from}: {e}. It was written by a different model or config; "
                    "start a new run.dir, or set train.resume=never to train from scratch here"
                ) from None
            loader.load_state_dict(doc["loader"])
            start_step = int(doc["step"])
            tokens_seen = int(doc.get("tokens", 0))
            bad_total = int(doc.get("bad_steps", 0))
            say(f"resuming from {resumed_from} (step {start_step})")
    elif list(ckpt_root.glob("step_*")):
        say(f"train.resume=never: starting fresh; older checkpoints in {ckpt_root} will be rotated out")
    save_config(cfg, run_dir / "config.yaml")

    is_main = rank == 0
    metrics = MetricsLogger(
        run_dir,
        cfg.log,
        config_to_dict(cfg),
        resume_step=start_step if resumed_from is not None else None,
        enabled=is_main,
        log=say,
    )
    fpt = flops_per_token(model, cfg.model, dc.seq_len)
    peak = device_peak_flops(device, cfg.log.peak_tflops)
    tokens_per_step = tc.batch_size * dc.seq_len
    if resumed_from is not None:
        metrics.log({"event": "resume", "step": start_step, "from": str(resumed_from)})

    if is_main:
        say(
            f"run {run_dir}: {cfg.model.name} ({n_params / 1e6:.2f}M params, pattern {cfg.model.pattern!r}) on "
            f"{device}{' bf16 autocast' if amp_dtype else ' fp32'}; {tc.max_steps} steps x {tc.batch_size} seqs x "
            f"{dc.seq_len} tokens ({accum} micro-batch{'es' if accum > 1 else ''} of {micro}); "
            f"{data_desc}"
        )

    bar = tqdm(
        total=tc.max_steps,
        initial=start_step,
        disable=not (cfg.log.progress and is_main),
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        leave=True,
    )
    if log is None and not bar.disable:
        say = tqdm.write

    def evaluate() -> float | None:
        if not val:
            return None
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b in val:
                b = b.to(device, non_blocking=True)
                n = b.num_targets() if isinstance(b, LabeledBatch) else b.shape[0] * (b.shape[1] - 1)
                total += float(_compute_loss(model, b, amp_dtype)) * n
                count += n
        model.train()
        return total / max(count, 1)

    def checkpoint(step: int) -> Path:
        state = {
            "loader": loader.state_dict(),
            "schedule": schedule.state_dict(),
            "tokens": tokens_seen,
            "bad_steps": bad_total,
            "config": config_to_dict(cfg),
        }
        return save_checkpoint(ckpt_root, step, model, optimizer, state, keep_last=tc.keep_last)

    result = RunResult(run_dir=run_dir, status="completed", step=start_step, start_step=start_step, config=cfg)
    result.checkpoint = resumed_from
    params = [p for g in optimizer.param_groups for p in g["params"]]
    consecutive_bad = 0
    window_tokens, window_time, window_losses = 0, 0.0, []
    val_loss: float | None = None
    in_update = False
    model.train()
    step = start_step
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = schedule.apply(optimizer, step)
            tokens = loader.batch(step).to(device, non_blocking=True)
            loss_sum = torch.zeros((), device=device)
            for i in range(accum):
                mb = tokens[i * micro : (i + 1) * micro]
                loss = _compute_loss(model, mb, amp_dtype)
                (loss / accum).backward()
                loss_sum += loss.detach()
            loss_val = float(loss_sum) / accum
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            step += 1
            loader.step = step
            tokens_seen += tokens_per_step
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad += 1
                bad_total += 1
                what = "loss" if not math.isfinite(loss_val) else "gradient norm"
                say(f"step {step}: non-finite {what}; step skipped ({consecutive_bad}/{tc.max_bad_steps} in a row)")
                metrics.log({"event": "skip", "step": step, "loss": loss_val, "grad_norm": grad_norm})
                bar.update(1)
                if consecutive_bad >= tc.max_bad_steps:
                    last = result.checkpoint
                    msg = (
                        f"training stopped at step {step}: {consecutive_bad} consecutive steps had a non-finite loss "
                        f"or gradient. The last good checkpoint is {last or 'none (none was written yet)'}. "
                        "Lower train.lr, raise train.warmup_steps or check the data, then resume with "
                        "train.resume=auto (it continues from that checkpoint)."
                    )
                    metrics.log({"event": "diverged", "step": step, "message": msg})
                    result.status, result.message = "diverged", msg
                    break
                continue
            in_update = True
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            in_update = False
            consecutive_bad = 0
            result.losses[step] = loss_val
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            window_tokens += tokens_per_step
            window_time += dt
            window_losses.append(loss_val)
            bar.update(1)
            last_step = step == tc.max_steps
            if step % tc.log_every == 0 or step == start_step + 1 or last_step:
                tps = window_tokens / max(window_time, 1e-9)
                row: dict[str, Any] = {
                    "step": step,
                    "loss": loss_val,
                    "loss_avg": sum(window_losses) / len(window_losses),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tps,
                    "tokens": tokens_seen,
                    "elapsed_s": time.perf_counter() - t_start,
                }
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                    if peak:
                        row["mfu"] = fpt * tps / (peak * world)
                metrics.log(row)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                window_tokens, window_time, window_losses = 0, 0.0, []
            if (tc.eval_every and step % tc.eval_every == 0) or last_step:
                val_loss = evaluate()
                if val_loss is not None:
                    metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
                    say(f"step {step}: val_loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50.0)):.2f})")
            if (tc.save_every and step % tc.save_every == 0) or last_step:
                result.checkpoint = checkpoint(step)
    except KeyboardInterrupt:
        result.status = "interrupted"
        if not in_update and consecutive_bad == 0 and step > start_step:
            result.checkpoint = checkpoint(step)
            result.message = f"interrupted at step {step}; checkpoint written to {result.checkpoint}"
        else:
            result.message = f"interrupted at step {step}; the last checkpoint is {result.checkpoint}"
        say(result.message)
    finally:
        bar.close()
    result.step = step
    result.val_loss = val_loss
    result.tokens = tokens_seen
    result.bad_steps = bad_total
    if result.status == "completed" and tc.export and is_main:
        result.exported = export(model, cfg.model, run_dir, tokenizer=dc.tokenizer)
    result.elapsed_s = time.perf_counter() - t_start
    metrics.close()
    return result
