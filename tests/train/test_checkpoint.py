"""Checkpoints: exact round trip of model + optimizer + RNG, atomic writes, rotation, damage detection."""

from __future__ import annotations

import json

import pytest
import torch

from mixlab.config import ModelConfig, TrainConfig
from mixlab.models import build_model
from mixlab.train.checkpoint import (
    CheckpointError,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from mixlab.train.optim import build_optimizer

CFG = ModelConfig(name="t", vocab_size=64, d_model=16, n_layers=2, pattern="A", d_intermediate=32)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(CFG)
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    for _ in range(2):
        x = torch.randint(0, 64, (2, 8))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_is_exact_and_restores_rng(tmp_path) -> None:
    model, opt = _trained()
    assert model.lm_head.weight is model.embed.weight  # tied: stored once, restored tied
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 2, model, opt, {"loader": {"step": 2}, "note": "x"})
    expected_rand = torch.rand(3)
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "train_state.json",
    ]  # tensors in safetensors, the rest JSON: nothing to unpickle
    other, other_opt = _trained(seed=1)
    doc = load_checkpoint(path, other, other_opt)
    assert doc["step"] == 2 and doc["loader"] == {"step": 2} and doc["note"] == "x"
    assert other.lm_head.weight is other.embed.weight
    for (n, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(p, q), n
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), (k, name)
    assert sa["param_groups"] == sb["param_groups"]
    assert torch.equal(torch.rand(3), expected_rand)  # RNG state restored


def test_writes_are_atomic_and_rotation_keeps_the_newest(tmp_path) -> None:
    model, opt = _trained()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list(tmp_path.glob(".tmp-*"))

    class Boom(RuntimeError):
        pass

    def fail(*_a, **_k):
        raise Boom

    import mixlab.train.checkpoint as ck

    real = ck._save_tensors
    ck._save_tensors = fail
    try:
        with pytest.raises(Boom):
            save_checkpoint(tmp_path, 5, model, opt, {})
    finally:
        ck._save_tensors = real
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]  # no half step 5
    assert not list(tmp_path.glob(".tmp-*"))


def test_damage_is_detected_and_find_resume_falls_back(tmp_path) -> None:
    model, opt = _trained()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {})
    c1, c2, c3, c4 = list_checkpoints(tmp_path)
    f = c4 / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))
    f = c3 / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    (c2 / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match="CRC32"):
        verify_checkpoint(c4)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(c3)
    with pytest.raises(CheckpointError, match="partial write"):
        verify_checkpoint(c2)
    msgs: list[str] = []
    found = find_resume(tmp_path, log=msgs.append)
    assert found is not None and found[0] == c1
    assert len(msgs) == 3 and all(m.startswith("skipping corrupt checkpoint") for m in msgs)
    assert find_resume(tmp_path / "none", log=msgs.append) is None
    # a state file that does not say complete is not trusted either
    doc = json.loads((c1 / "train_state.json").read_text())
    doc["complete"] = False
    (c1 / "train_state.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="complete"):
        load_checkpoint(c1, model, opt)


def test_loading_into_a_different_model_fails_clearly(tmp_path) -> None:
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    bigger = build_model(ModelConfig(name="t", vocab_size=64, d_model=16, n_layers=3, pattern="A", d_intermediate=32))
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_checkpoint(path, bigger)
