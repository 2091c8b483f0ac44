"""The one training loop, for every architecture, from one CPU process to many GPUs on many nodes.

``train(config)``: join the process group (``parallel.strategy`` ``none`` | ``ddp`` | ``fsdp``;
``mixlab.train.distributed``) → resolve the run directory → tokenizer and token shards (prepared
once per node, then reused) → model built on the meta device, materialised and initialised with
the run's seed, made identical on every rank → activation checkpointing / ``torch.compile`` per
block → DDP or FSDP2 (``mixlab.train.parallel``) → AdamW + schedule → resume from the newest intact
checkpoint (``train.resume=auto``; any number of ranks may have written it) → for each step: this
rank's share of the loader's global batch for that step, forward and backward over micro-batches
(gradient accumulation; only the last micro-batch all-reduces), clip, step → metrics → eval every
``train.eval_every`` → checkpoint every ``train.save_every`` → export at the end.

``train.batch_size`` is the global batch whatever the world size: each rank takes
``batch_size / world_size`` sequences, in micro-batches of ``train.micro_batch_size``. Losses,
gradient norms and evaluation losses are averaged over ranks; metrics, ``config.yaml`` and the
export are written by rank 0, checkpoints by all ranks (``mixlab.train.checkpoint``).

Precision: float32 master weights; bf16 autocast on CUDA (``train.precision=auto``), float32 on
the CPU. A non-finite loss or gradient norm skips the step (no update, the batch is consumed);
``train.max_bad_steps`` consecutive ones stop the run, leaving the last good checkpoint in place.

SIGTERM / SIGUSR1 (preemption; with several ranks SIGINT too) stop the run at the end of the
current step with a checkpoint (``RunResult.status == "preempted"``).
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
from mixlab.train import distributed
from mixlab.train.checkpoint import CheckpointError, find_resume, load_checkpoint, save_checkpoint, verify_checkpoint
from mixlab.train.export import export
from mixlab.train.metrics import MetricsLogger, device_peak_flops, flops_per_token
from mixlab.train.optim import LRSchedule, build_optimizer
from mixlab.train.parallel import (
    apply_activation_checkpointing,
    broadcast_parameters,
    clip_for_fused_step,
    clip_grad_norm,
    full_model_state,
    lm_loss,
    parallelize,
)

__all__ = ["RunResult", "TrainingDiverged", "apply_activation_checkpointing", "resolve_device", "train"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


@dataclass
class RunResult:
    """What a run did. ``status``: ``completed`` | ``diverged`` | ``interrupted`` | ``preempted``."""

    run_dir: Path
    status: str
    step: int
    start_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss of every step (mean over ranks)
    val_loss: float | None = None
    checkpoint: Path | None = None
    exported: Path | None = None
    tokens: int = 0
    bad_steps: int = 0
    elapsed_s: float = 0.0
    message: str = ""
    config: Config | None = None
    rank: int = 0
    world_size: int = 1

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


def _compute_loss(model: nn.Module, tokens: Any, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens [B, T+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``),
    or of a synthetic task's ``LabeledBatch`` (inputs and labels ``[B, T]``, -100 = not scored).

    ``model``: a bare ``LanguageModel``, or the runner of :func:`~mixlab.train.parallel.parallelize`
    (a ``LossModule``, possibly inside DDP / FSDP, which knows its own autocast dtype)."""
    all_scored = not isinstance(tokens, LabeledBatch)  # a token stream scores every target: no host-side count
    if isinstance(tokens, LabeledBatch):
        inputs, targets = tokens.inputs, tokens.labels
    else:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if hasattr(model, "forward_hidden"):
        return lm_loss(model, inputs, targets, amp_dtype, all_scored)
    return model(inputs, targets, all_scored=all_scored)


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


def _check_batch(batch_size: int, micro: int, world: int) -> tuple[int, int, int]:
    """``(local batch, micro-batch, accumulation steps)`` of a global batch over ``world`` ranks."""
    if batch_size % world:
        lo, hi = (batch_size // world) * world, (batch_size // world + 1) * world
        raise ConfigError(
            f"train.batch_size={batch_size} (the global batch, in sequences) must be a multiple of the number of "
            f"ranks {world}; use e.g. train.batch_size={hi}" + (f" or {lo}" if lo else "")
        )
    local = batch_size // world
    micro = micro or local
    if local % micro:
        raise ConfigError(
            f"the per-rank batch {local} (train.batch_size={batch_size} / {world} ranks) must be a multiple of "
            f"train.micro_batch_size={micro}; pick a micro-batch that divides {local}"
        )
    return local, micro, local // micro


# ------------------------------------------------------------------ the loop


def train(config: Config, log=None) -> RunResult:
    """Train ``config`` (see the module docstring); returns a :class:`RunResult` (on every rank).

    ``log``: a ``print``-like function for progress messages (default: print, or tqdm.write
    while the progress bar is shown); only rank 0 logs progress."""
    say = log or print
    from mixlab.train.parallel import training_allocator

    training_allocator()  # before the first CUDA allocation
    ctx = distributed.setup(config.parallel, config.run.device, log=say)
    try:
        return _train(config, ctx, log)
    finally:
        ctx.close()


def _train(config: Config, ctx: distributed.DistContext, log) -> RunResult:
    from tqdm.auto import tqdm

    from mixlab.models import build_model

    t_start = time.perf_counter()
    is_main = ctx.is_main
    say = (log or print) if is_main else (lambda _m: None)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    amp_dtype = _amp_dtype(config.train.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Preemption: SIGTERM / SIGUSR1 always; SIGINT too with several ranks (they must stop at the same step).
    ctx.preempt = distributed.PreemptionFlag(sigint=world > 1)

    cfg, tok = _prepare_config(config)
    if ctx.distributed:  # every rank must use rank 0's run directory (its default name holds a timestamp)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=ctx.broadcast_object(cfg.run.dir)))
    tc, dc = cfg.train, cfg.data
    local_batch, micro, accum = _check_batch(tc.batch_size, tc.micro_batch_size, world)
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # data: the text corpus, or a synthetic task's labeled batches (task=mqar | selective_copying)
    loader: TrainLoader | SyntheticLoader
    if cfg.task != "text":
        loader = SyntheticLoader(cfg.task, cfg.synthetic, dc.seq_len, tc.batch_size, cfg.run.seed, rank, world)
        val = loader.eval_batches()
        data_desc = f"synthetic task {cfg.task} ({cfg.synthetic.eval_examples} held-out sequences)"
    else:
        # The first rank of each node tokenises (or finds the cache); the others then reuse its shards.
        if ctx.local_rank != 0:
            ctx.barrier()
        shards = prepare_shards(dc, tokenizer=tok, log=say)
        if ctx.local_rank == 0:
            ctx.barrier()
        if not shards.train:
            raise ValueError(f"data.source {dc.sources} gave no training tokens")
        loader = TrainLoader(shards.train, dc.seq_len, tc.batch_size, seed=cfg.run.seed, rank=rank, world_size=world)
        # batches of the global size, split over ranks: the same held-out windows at any world size
        val = eval_batches(shards.val, dc.seq_len, tc.batch_size, tc.eval_batches, rank, world)
        if not val:
            say(f"note: the held-out split ({shards.val_tokens} tokens) is shorter than one window; no evaluation")
        data_desc = f"data {shards.train_tokens:,} train / {shards.val_tokens:,} val tokens"

    # model: the same seeded init as one process, then rank 0's weights everywhere
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % (1 << 32))
    model = build_model(cfg.model, device=device, dtype=torch.float32)
    n_params = model.num_parameters()
    fpt = flops_per_token(model, cfg.model, dc.seq_len)
    broadcast_parameters(model)
    par = parallelize(
        model, cfg.parallel, device, amp_dtype, tc.activation_checkpointing, tc.compile, keep_states=tc.keep_states
    )
    runner = par.runner
    optimizer = build_optimizer(model, tc)
    schedule = LRSchedule(tc)

    # resume: rank 0 picks and verifies the checkpoint, every rank loads its share
    start_step, tokens_seen, bad_total = 0, 0, 0
    resumed_from: Path | None = None
    if tc.resume != "never":
        found: tuple[Path, dict] | None = None
        error: str | None = None
        if is_main:
            if tc.resume == "auto":
                found = find_resume(ckpt_root, log=say)
            else:
                try:
                    found = (Path(tc.resume), verify_checkpoint(tc.resume))
                except CheckpointError as e:
                    error = f"train.resume={tc.resume!r}: {e}"
        found, error = ctx.broadcast_object((found, error))
        if error is not None:
            raise CheckpointError(error)
        if found is not None:
            resumed_from, doc = found
            try:
                with ctx.phase("checkpoint load", start_step, timeout=ctx.io_timeout_s):
                    load_checkpoint(resumed_from, model, optimizer, doc=doc, process_group=ctx.io_group)
            except CheckpointError as e:
                raise CheckpointError(
                    f"cannot resume from {resumed_from}: {e}. It was written by a different model or config; "
                    "start a new run.dir, or set train.resume=never to train from scratch here"
                ) from None
            loader.load_state_dict(doc["loader"])
            start_step = int(doc["step"])
            tokens_seen = int(doc.get("tokens", 0))
            bad_total = int(doc.get("bad_steps", 0))
            saved_world = int(doc.get("world_size", 1))
            resharded = f", saved on {saved_world} rank(s), resumed on {world}" if saved_world != world else ""
            say(f"resuming from {resumed_from} (step {start_step}{resharded})")
    elif is_main and list(ckpt_root.glob("step_*")):
        say(f"train.resume=never: starting fresh; older checkpoints in {ckpt_root} will be rotated out")
    if is_main:
        save_config(cfg, run_dir / "config.yaml")

    metrics = MetricsLogger(
        run_dir,
        cfg.log,
        config_to_dict(cfg),
        resume_step=start_step if resumed_from is not None else None,
        enabled=is_main,
        log=say,
    )
    peak = device_peak_flops(device, cfg.log.peak_tflops)
    tokens_per_step = tc.batch_size * dc.seq_len
    if resumed_from is not None:
        metrics.log({"event": "resume", "step": start_step, "from": str(resumed_from), "world_size": world})

    if is_main:
        ac = tc.activation_checkpointing
        extras = [
            f"{cfg.parallel.strategy} on {world} rank(s)" if ctx.distributed else "",
            f"activation checkpointing {ac}" if ac != "none" else "",
            f"chunk states kept by {par.kept_states} layer(s)" if par.kept_states else "",
            "compiled blocks" if tc.compile else "",
        ]
        extra = "; ".join(e for e in extras if e)
        say(
            f"run {run_dir}: {cfg.model.name} ({n_params / 1e6:.2f}M params, pattern {cfg.model.pattern!r}) on "
            f"{device}{' bf16 autocast' if amp_dtype else ' fp32'}; {tc.max_steps} steps x {tc.batch_size} seqs x "
            f"{dc.seq_len} tokens ({local_batch} per rank, {accum} micro-batch{'es' if accum > 1 else ''} of "
            f"{micro}); {data_desc}" + (f"; {extra}" if extra else "")
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

    def evaluate(step: int) -> float | None:
        if not val:
            return None
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * targets, targets
        with ctx.phase("eval", step, timeout=max(ctx.timeout_s, ctx.io_timeout_s)), torch.no_grad():
            for b in val:
                b = b.to(device, non_blocking=True)
                n = b.num_targets() if isinstance(b, LabeledBatch) else b.shape[0] * (b.shape[1] - 1)
                sums[0] += _compute_loss(runner, b, amp_dtype).double() * n
                sums[1] += n
            ctx.all_reduce_sum(sums)
        model.train()
        return float(sums[0] / sums[1].clamp(min=1))

    def checkpoint(step: int) -> Path:
        state = {
            "loader": loader.state_dict(),
            "schedule": schedule.state_dict(),
            "tokens": tokens_seen,
            "bad_steps": bad_total,
            "config": config_to_dict(cfg),
        }
        with ctx.phase("checkpoint save", step, timeout=ctx.io_timeout_s):
            return save_checkpoint(
                ckpt_root, step, model, optimizer, state, keep_last=tc.keep_last, process_group=ctx.io_group
            )

    result = RunResult(
        run_dir=run_dir, status="completed", step=start_step, start_step=start_step, config=cfg, rank=rank,
        world_size=world,
    )  # fmt: skip
    result.checkpoint = resumed_from
    params = [p for g in optimizer.param_groups for p in g["params"]]
    consecutive_bad = 0
    window_tokens, window_time, window_losses = 0, 0.0, []
    val_loss: float | None = None
    in_update = False
    preempted: str | None = None
    model.train()
    step = start_step
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = schedule.apply(optimizer, step)
            # The first step compiles and autotunes: give it more time before calling it a hang.
            step_timeout = ctx.timeout_s * (4 if step == start_step else 1)
            with ctx.phase("train step", step + 1, timeout=step_timeout):
                tokens = loader.batch(step).to(device, non_blocking=True)
                loss_sum = torch.zeros((), device=device)
                for i in range(accum):
                    mb = tokens[i * micro : (i + 1) * micro]
                    with par.grad_sync(i == accum - 1):
                        loss = _compute_loss(runner, mb, amp_dtype)
                        (loss / accum).backward()
                    loss_sum += loss.detach()
                # one all-reduce for the mean loss and the preemption vote of every rank
                stats = torch.stack([loss_sum / accum, torch.zeros((), device=device)])
                if ctx.preempt is not None and ctx.preempt.requested:
                    stats[1] = 1.0
                ctx.all_reduce_sum(stats)
                max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
                # A fused optimizer's step is queued before anything is read back (its kernels skip a step whose
                # loss or gradient norm is not finite): one host synchronisation per step, on `host` below.
                fused_norm = clip_for_fused_step(params, max_norm, optimizer, stats[0])
                if fused_norm is not None:
                    in_update = True  # until `step` counts this update (a checkpoint in between would be off by one)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats = torch.cat([stats, fused_norm.reshape(1).to(stats.dtype)])
                host = stats.tolist()
                loss_val = host[0] / world
                stop_votes = round(host[1])
                grad_norm = host[2] if fused_norm is not None else clip_grad_norm(params, max_norm, optimizer)
            if stop_votes and preempted is None:
                preempted = (ctx.preempt.requested if ctx.preempt and ctx.preempt.requested else None) or (
                    f"a signal on {stop_votes} other rank(s)"
                )
            step += 1
            in_update = False
            loader.step = step
            tokens_seen += tokens_per_step
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)  # (the fused path skipped the update on the device)
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
                if preempted:
                    break  # no checkpoint of a skipped step: the last good one stays the newest
                continue
            if fused_norm is None:
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
            if step % tc.log_every == 0 or step == start_step + 1 or last_step or preempted:
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
            if preempted:
                result.checkpoint = checkpoint(step)
                break
            if (tc.eval_every and step % tc.eval_every == 0) or last_step:
                val_loss = evaluate(step)
                if val_loss is not None:
                    metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
                    say(f"step {step}: val_loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50.0)):.2f})")
            if (tc.save_every and step % tc.save_every == 0) or (last_step and tc.save_final):
                result.checkpoint = checkpoint(step)
    except KeyboardInterrupt:
        result.status = "interrupted"
        # With several ranks a checkpoint needs every rank: SIGINT is handled as a preemption there,
        # so reaching this point means a second Ctrl-C: stop at once.
        if world == 1 and not in_update and consecutive_bad == 0 and step > start_step:
            result.checkpoint = checkpoint(step)
            result.message = f"interrupted at step {step}; checkpoint written to {result.checkpoint}"
        else:
            result.message = f"interrupted at step {step}; the last checkpoint is {result.checkpoint}"
        say(result.message)
    finally:
        bar.close()
    if preempted and result.status == "completed":
        result.status = "preempted"
        result.message = (
            f"stopped by {preempted} after step {step}; checkpoint written to {result.checkpoint}. "
            "Rerun the same command with train.resume=auto to continue."
        )
        metrics.log({"event": "preempted", "step": step, "signal": preempted, "checkpoint": str(result.checkpoint)})
        say(result.message)
    result.step = step
    result.val_loss = val_loss
    result.tokens = tokens_seen
    result.bad_steps = bad_total
    if result.status == "completed" and tc.export:
        with ctx.phase("export", step, timeout=ctx.io_timeout_s):
            # a collective under FSDP; otherwise rank 0 holds the whole model already
            state = full_model_state(model) if is_main or par.strategy == "fsdp" else {}
            if is_main:
                result.exported = export(None, cfg.model, run_dir, tokenizer=dc.tokenizer, state=state)
    ctx.barrier()
    result.elapsed_s = time.perf_counter() - t_start
    metrics.close()
    return result
