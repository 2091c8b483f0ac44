"""The training loop end to end on a tiny model: loss falls, exact resume, NaN handling, accumulation."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import mixlab.train.loop as loop
from mixlab.cli import main
from mixlab.configio import load_config
from mixlab.data.loader import TrainLoader
from mixlab.train import load_model, read_metrics, train, verify_checkpoint
from mixlab.train.checkpoint import list_checkpoints, load_checkpoint
from mixlab.train.optim import build_optimizer


def _quiet(_msg: str) -> None:
    pass


def _train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "tokens_per_s" in r}


def test_short_run_loss_falls_and_leaves_a_complete_run_dir(tiny) -> None:
    cfg = tiny("run", "train.max_steps=40", "train.eval_every=20", "train.save_every=20")
    res = train(cfg, log=_quiet)
    assert res.status == "completed" and res.step == 40 and sorted(res.losses) == list(range(1, 41))
    first, last = res.losses[1], sum(res.losses[k] for k in range(36, 41)) / 5
    assert first > 5.0  # ~ln(320) at init
    assert last < first - 2.0, (first, last)
    assert res.val_loss is not None and res.val_loss < first - 2.0
    rows = read_metrics(res.run_dir)
    train_rows = [r for r in rows if "tokens_per_s" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens", "elapsed_s"):
        assert all(isinstance(r[key], (int, float)) and math.isfinite(r[key]) for r in train_rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    # the run dir reruns the run and holds the exported model
    assert load_config(res.run_dir / "config.yaml") == res.config
    assert res.config.model.vocab_size == 320  # byte vocabulary (257) rounded up to 64
    assert [p.name for p in list_checkpoints(res.run_dir / "checkpoints")] == ["step_00000020", "step_00000040"]
    model, mcfg = load_model(res.run_dir)
    assert mcfg == res.config.model
    # the export equals the final checkpoint's weights
    from mixlab.models import build_model

    other = build_model(mcfg)
    load_checkpoint(res.run_dir / "checkpoints" / "step_00000040", other, restore_rng=False)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(x), other(x))


def test_save_final_false_writes_no_checkpoint_at_the_end(tiny) -> None:
    res = train(tiny("bench", "train.max_steps=3", "train.save_every=2", "train.save_final=false"), log=_quiet)
    assert res.status == "completed" and res.step == 3
    assert [p.name for p in list_checkpoints(res.run_dir / "checkpoints")] == ["step_00000002"]


def test_resume_after_a_stop_is_bit_identical(tiny, monkeypatch) -> None:
    full = train(tiny("full", "train.max_steps=12", "train.save_every=4"), log=_quiet)

    real_batch = TrainLoader.batch

    def stop_at_8(self, step):
        if step == 7:  # loading the 8th step's batch: as if Ctrl-C arrived after step 7
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TrainLoader, "batch", stop_at_8)
    part = train(tiny("part", "train.max_steps=12", "train.save_every=4"), log=_quiet)
    assert part.status == "interrupted" and part.step == 7
    assert part.checkpoint is not None and part.checkpoint.name == "step_00000007"
    monkeypatch.setattr(TrainLoader, "batch", real_batch)
    msgs: list[str] = []
    rest = train(tiny("part", "train.max_steps=12", "train.save_every=4", "train.resume=auto"), log=msgs.append)
    assert any("resuming from" in m and "step_00000007" in m for m in msgs)
    assert rest.start_step == 7 and sorted(rest.losses) == list(range(8, 13))
    for step in range(8, 13):
        assert rest.losses[step] == full.losses[step], step  # bit-identical
    assert _train_losses(rest.run_dir) == _train_losses(full.run_dir)  # one clean history in metrics.jsonl


def test_independent_check_via_cli_delete_later_checkpoints_and_resume(tiny, capsys) -> None:
    run_dir = tiny.root / "cli-run"
    args = ["train", *tiny.overrides, "train.max_steps=12", "train.save_every=3", f"run.dir={run_dir}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "mixlab generate" in out and "train.resume=auto" in out
    before = _train_losses(run_dir)
    assert sorted(before) == list(range(1, 13))
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000006", "step_00000009", "step_00000012"]  # keep_last=3
    for p in ckpts[1:]:
        shutil.rmtree(p)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.out + captured.err and "step_00000006" in captured.out + captured.err
    after = _train_losses(run_dir)
    assert {s: after[s] for s in range(7, 13)} == {s: before[s] for s in range(7, 13)}
    assert (run_dir / "metrics.before-resume-6.jsonl").is_file()


def test_corrupt_and_partial_checkpoints_are_reported_and_skipped(tiny) -> None:
    full = train(tiny("run", "train.max_steps=8", "train.save_every=4"), log=_quiet)
    ckpt = full.run_dir / "checkpoints"
    weights = ckpt / "step_00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    weights.write_bytes(bytes(data))
    (ckpt / ".tmp-step_00000009-1").mkdir()  # an interrupted write
    msgs: list[str] = []
    again = train(tiny("run", "train.max_steps=8", "train.save_every=4", "train.resume=auto"), log=msgs.append)
    assert any("skipping corrupt checkpoint" in m and "step_00000008" in m and "CRC32" in m for m in msgs), msgs
    assert any("skipping partial checkpoint" in m for m in msgs)
    assert any("resuming from" in m and "step_00000004" in m for m in msgs)
    assert again.start_step == 4
    assert all(again.losses[s] == full.losses[s] for s in range(5, 9))
    # naming a damaged checkpoint explicitly is an error, not a silent load
    weights = ckpt / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(Exception, match="truncated"):
        train(tiny("run", f"train.resume={ckpt / 'step_00000004'}"), log=_quiet)


def _nan_at(steps: set[int], monkeypatch) -> None:
    """Make the loss NaN on the optimizer steps in ``steps`` (1-based; one micro-batch per step)."""
    real = loop._compute_loss
    calls = {"n": 0}

    def fake(model, tokens, amp_dtype):
        loss = real(model, tokens, amp_dtype)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "_compute_loss", fake)


def _fused_optimizer(monkeypatch) -> None:
    """The loop's optimizer fused, as on CUDA (PyTorch has a fused AdamW for CPU too): the step is queued before the
    loss and norm are read back, and a non-finite step is skipped by the optimizer's kernels."""

    def fused(model, tc):
        groups = [
            {k: v for k, v in g.items() if k not in ("foreach", "fused")}
            for g in build_optimizer(model, tc).param_groups
        ]
        return torch.optim.AdamW(groups, fused=True)

    monkeypatch.setattr(loop, "build_optimizer", fused)


@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_step_is_skipped_and_counted(tiny, monkeypatch, fused) -> None:
    if fused:
        _fused_optimizer(monkeypatch)
    _nan_at({3}, monkeypatch)
    res = train(tiny("run", "train.max_steps=6"), log=_quiet)
    assert res.status == "completed" and res.bad_steps == 1
    assert sorted(res.losses) == [1, 2, 4, 5, 6] and all(math.isfinite(v) for v in res.losses.values())
    skips = [r for r in read_metrics(res.run_dir) if r.get("event") == "skip"]
    assert [r["step"] for r in skips] == [3] and skips[0]["loss"] is None


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_leaves_the_weights_alone(tiny, monkeypatch, fused) -> None:
    if fused:
        _fused_optimizer(monkeypatch)
    cfg = tiny("run", "train.max_steps=1", "train.save_every=1", "train.export=false")
    train(cfg, log=_quiet)
    _nan_at({1}, monkeypatch)
    res = train(tiny("run", "train.max_steps=2", "train.save_every=1", "train.resume=auto"), log=_quiet)
    assert res.bad_steps == 1 and res.losses == {} and res.step == 2
    # no checkpoint is written for a skipped step; the exported weights are step 1's
    assert [p.name for p in list_checkpoints(res.run_dir / "checkpoints")] == ["step_00000001"]
    from mixlab.models import build_model

    before = build_model(res.config.model)
    load_checkpoint(res.run_dir / "checkpoints" / "step_00000001", before, restore_rng=False)
    after, _ = load_model(res.run_dir)
    assert all(torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))


def test_repeated_nan_stops_and_keeps_the_last_good_checkpoint(tiny, monkeypatch, capsys) -> None:
    _nan_at(set(range(6, 100)), monkeypatch)
    res = train(tiny("run", "train.max_steps=20", "train.save_every=2", "train.max_bad_steps=3"), log=_quiet)
    assert res.status == "diverged" and res.step == 8 and res.bad_steps == 3
    good = res.run_dir / "checkpoints" / "step_00000004"
    assert str(good) in res.message and "3 consecutive steps" in res.message and "train.lr" in res.message
    assert [p.name for p in list_checkpoints(res.run_dir / "checkpoints")][-1] == "step_00000004"
    assert verify_checkpoint(good)["step"] == 4
    assert not (res.run_dir / "model.safetensors").exists()  # no export of a diverged run


def test_gradient_accumulation_matches_the_full_batch(tiny) -> None:
    a = train(tiny("a", "train.max_steps=3", "train.export=false", "train.save_every=0"), log=_quiet)
    b = train(
        tiny("b", "train.max_steps=3", "train.export=false", "train.micro_batch_size=1", "train.save_every=0"),
        log=_quiet,
    )
    for s in (1, 2, 3):
        assert b.losses[s] == pytest.approx(a.losses[s], rel=1e-5, abs=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(tiny) -> None:
    from mixlab.models import build_model

    cfg = tiny("x").model
    torch.manual_seed(0)
    plain = build_model(cfg)
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    assert loop.apply_activation_checkpointing(ckpt) == cfg.n_layers
    tokens = torch.randint(0, 256, (2, 17))
    for m in (plain, ckpt):
        loop._compute_loss(m, tokens, None).backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    build_optimizer(ckpt, tiny("x").train)  # the wrapped model still builds its optimizer


def test_keep_states_reaches_the_model_and_the_start_line(tiny, monkeypatch) -> None:
    """``train.keep_states=true`` is applied to the delta-rule mixers (here with the fused forward's limit below
    the tiny model's key head dim, so that keeping pays) and named in the run's first line."""
    from mixlab.ops._triton import chunk

    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "max_k": 0})
    seen: dict = {}
    real = loop.parallelize

    def spy(model, *a, **k):
        par = real(model, *a, **k)
        seen["kept"] = [b.mixer.keep_states for b in model.layers]
        return par

    monkeypatch.setattr(loop, "parallelize", spy)
    lines: list[str] = []
    cfg = tiny("keep", "model.pattern=G", "train.max_steps=1", "train.keep_states=true")
    assert train(cfg, log=lines.append).status == "completed"
    assert seen["kept"] == [True, True]
    assert any("chunk states kept by 2 layer(s)" in line for line in lines)


def test_resuming_into_a_different_model_says_what_to_do(tiny) -> None:
    train(tiny("run", "train.max_steps=2", "train.save_every=2", "train.export=false"), log=_quiet)
    with pytest.raises(Exception, match=r"different model or config.*train.resume=never"):
        train(tiny("run", "train.max_steps=4", "model.d_model=48"), log=_quiet)


def test_metric_sinks_tensorboard_and_wandb_offline(tiny, monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = train(
        tiny("run", "train.max_steps=3", "log.tensorboard=true", "log.wandb=true", "log.wandb_mode=offline"),
        log=_quiet,
    )
    assert res.ok
    assert list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((res.run_dir / "wandb").glob("offline-run-*"))
