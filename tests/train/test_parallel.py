"""In-process pieces of multi-process training: batch splitting, activation checkpointing modes,
FSDP/DDP as a group of one, loading the previous single-process checkpoint format, the DCP files."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import mixlab.train.loop as loop
from mixlab.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from mixlab.configio import config_from_dict
from mixlab.models import build_model, get_preset
from mixlab.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    model_state_dict,
    read_model_state,
    save_checkpoint,
    verify_checkpoint,
)
from mixlab.train.optim import build_optimizer
from mixlab.train.parallel import apply_activation_checkpointing, checkpointed_blocks

CFG = ModelConfig(name="t", vocab_size=64, d_model=16, n_layers=3, pattern="A", d_intermediate=32)


def _quiet(_msg: str) -> None:
    pass


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


def _step(model, opt, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 8), generator=g)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_the_global_batch_is_split_over_ranks_or_the_error_says_how_to_fix_it() -> None:
    assert loop._check_batch(8, 0, 2) == (4, 4, 1)
    assert loop._check_batch(8, 2, 2) == (4, 2, 2)
    assert loop._check_batch(8, 1, 4) == (2, 1, 2)
    with pytest.raises(
        ConfigError, match=r"train.batch_size=6 .* multiple of the number of ranks 4; use e.g. train.batch_size=8 or 4"
    ):
        loop._check_batch(6, 0, 4)
    with pytest.raises(ConfigError, match=r"per-rank batch 4 .* train.micro_batch_size=3"):
        loop._check_batch(8, 3, 2)


def test_activation_checkpointing_modes_and_their_config_spelling() -> None:
    torch.manual_seed(0)
    plain = build_model(CFG)
    tokens = torch.randint(0, 64, (2, 9))
    loop._compute_loss(plain, tokens, None).backward()
    expected = {
        "full": [True] * 3,
        "selective": [True, False, True],
        "none": [False] * 3,
        "selective:1": [False, True, False],
        "selective:0.5": [True, False, True],
    }
    for mode, wrapped in (("full", 3), ("selective", 2), ("none", 0), ("selective:1", 1), ("selective:0.5", 2)):
        other = build_model(CFG)
        other.load_state_dict(plain.state_dict())
        assert apply_activation_checkpointing(other, mode) == wrapped
        is_wrapped = ["forward" in vars(b) for b in other.layers]
        assert is_wrapped == expected[mode]
        loop._compute_loss(other, tokens, None).backward()
        for (n, p), q in zip(plain.named_parameters(), other.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    with pytest.raises(ValueError, match="allowed: none, full, selective"):
        apply_activation_checkpointing(build_model(CFG), "some")
    # YAML booleans of older configs still mean full / none
    assert config_from_dict({"train": {"activation_checkpointing": True}}).train.activation_checkpointing == "full"
    assert config_from_dict({"train": {"activation_checkpointing": False}}).train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="allowed: none, full, selective"):
        config_from_dict({"train": {"activation_checkpointing": "half"}})
    assert config_from_dict({"train": {"activation_checkpointing": "selective:6"}}).train.activation_checkpointing == (
        "selective:6"
    )
    for bad in ("selective:1.5", "selective:-1", "selective:x", "full:2"):
        with pytest.raises(ConfigError, match="selective:N"):
            config_from_dict({"train": {"activation_checkpointing": bad}})
        with pytest.raises(ValueError, match="selective:N"):
            apply_activation_checkpointing(build_model(CFG), bad)


def test_kept_states_go_to_the_delta_rule_mixers_of_blocks_not_checkpointed(monkeypatch) -> None:
    """``train.keep_states``: the delta-rule mixers of plain blocks keep their chunk states where the forward runs
    unfused anyway; a checkpointed block's mixer does not (its forward runs again in backward); other mixers have
    no such switch."""
    from mixlab.layers.deltanet import DeltaNet
    from mixlab.ops._triton import chunk
    from mixlab.train.parallel import apply_state_keeping, parallelize

    model = build_model(get_preset("gdn_h1-tiny"))  # G S G S, key head dims <= 128: a fused forward
    assert parallelize(model, ParallelConfig(), torch.device("cpu"), None, "none", keep_states=True).kept_states == 0
    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "max_k": 0})  # as above K = 128
    model = build_model(get_preset("gdn_h1-tiny"))
    par = parallelize(model, ParallelConfig(), torch.device("cpu"), None, "selective:1", keep_states=True)  # block 2
    deltas = [b.mixer for b in model.layers if isinstance(b.mixer, DeltaNet)]
    assert [getattr(b, "activation_checkpointing", False) for b in model.layers] == [False, False, True, False]
    assert [m.keep_states for m in deltas] == [True, False] and par.kept_states == 1
    assert not any("keep_states" in vars(b.mixer) for b in model.layers if not isinstance(b.mixer, DeltaNet))
    assert apply_state_keeping(model, False) == 0 and not any(m.keep_states for m in deltas)
    # the config tree takes the key (an unknown one would be refused)
    assert config_from_dict({"train": {"keep_states": True}}).train.keep_states is True


@pytest.mark.parametrize(
    ("mode", "n", "chosen"),
    [
        ("selective:5", 21, [2, 6, 10, 14, 18]),
        ("selective:0.25", 8, [2, 6]),
        ("selective:0", 21, []),
        ("selective:30", 4, [0, 1, 2, 3]),
        ("selective", 5, [0, 2, 4]),
    ],
)
def test_checkpointed_blocks_spread_n_blocks_over_the_depth(mode, n, chosen) -> None:
    assert checkpointed_blocks(mode, n) == chosen


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_ddp_and_fsdp_started_as_one_plain_process_match_strategy_none(tiny, strategy) -> None:
    ref = train_quiet(tiny("ref", "train.max_steps=3", "train.save_every=3", "train.micro_batch_size=2"))
    res = train_quiet(
        tiny(
            strategy,
            "train.max_steps=3",
            "train.save_every=3",
            f"parallel.strategy={strategy}",
            "train.micro_batch_size=2",
        )
    )
    assert not dist.is_initialized()  # the group of one it made is gone
    for s in (1, 2, 3):
        assert res.losses[s] == pytest.approx(ref.losses[s], rel=1e-6, abs=1e-7)
    ckpt = list_checkpoints(res.run_dir / "checkpoints")[-1]
    doc = verify_checkpoint(ckpt)
    assert doc["format"] == "dcp-v1" and doc["world_size"] == 1
    assert sorted(doc["files"]) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    exported = read_model_state(res.run_dir / "checkpoints" / "step_00000003")
    ref_state = read_model_state(ref.run_dir / "checkpoints" / "step_00000003")
    assert exported.keys() == ref_state.keys()
    for k in exported:
        torch.testing.assert_close(exported[k], ref_state[k], rtol=1e-5, atol=1e-6)


def train_quiet(cfg):
    return loop.train(cfg, log=_quiet)


def test_dcp_files_are_plain_safetensors_with_their_layout_in_json(tmp_path) -> None:
    from safetensors import safe_open

    model, opt = _trained()
    path = save_checkpoint(tmp_path, 2, model, opt, {})
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as h:
        keys = set(h.keys())
        meta = json.loads(h.metadata()["mixlab_dcp"])
    assert "layers.0.mixer.q_proj.weight.exp_avg" in keys and "embed.weight.step" in keys
    assert meta["embed.weight.exp_avg"] == {
        "fqn": "embed.weight.exp_avg",
        "offsets": [0, 0],
        "size": [64, 16],
        "dtype": "float32",
    }
    state = read_model_state(path)
    assert state.keys() == model_state_dict(model).keys() and "lm_head.weight" not in state  # tied: stored once
    doc = json.loads((path / "train_state.json").read_text())
    group = doc["optimizer"]["param_groups"][0]
    assert group["params"][:2] == ["embed.weight", "layers.0.mixer.q_proj.weight"] and "fused" not in group


def _write_legacy(d, model, opt, step: int) -> None:
    """A checkpoint in the previous single-process layout (``safetensors-v1``), as it wrote them."""
    d.mkdir(parents=True)
    save_file(model_state_dict(model), str(d / "model.safetensors"))
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(d / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    np_state = np.random.get_state()
    save_file(
        {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))},
        str(d / "rng.safetensors"),
    )
    import random

    py = random.getstate()
    files = {}
    for p in sorted(d.iterdir()):
        files[p.name] = {"bytes": p.stat().st_size, "crc32": zlib.crc32(p.read_bytes())}
    doc = {
        "format": "safetensors-v1",
        "step": step,
        "files": files,
        "optimizer": {"param_groups": groups, "scalars": {}},
        "rng": {
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]],
        },
        "complete": True,
    }
    (d / "train_state.json").write_text(json.dumps(doc))


def test_checkpoints_of_the_previous_single_process_format_still_load(tmp_path) -> None:
    model, opt = _trained()
    torch.manual_seed(7)
    _write_legacy(tmp_path / "step_00000002", model, opt, 2)
    expected_rand = torch.rand(3)
    other, other_opt = _trained(seed=1)
    doc = load_checkpoint(tmp_path / "step_00000002", other, other_opt)
    assert doc["step"] == 2 and torch.equal(torch.rand(3), expected_rand)
    assert other.lm_head.weight is other.embed.weight
    for (n, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(p, q), n
    # both continue identically: the optimizer state came back too
    for seed in (10, 11):
        assert torch.equal(_step(model, opt, seed), _step(other, other_opt, seed))
    # and the next save writes the current format, which loads the same way
    path = save_checkpoint(tmp_path, 4, other, other_opt, {})
    assert verify_checkpoint(path)["format"] == "dcp-v1"
    third, third_opt = _trained(seed=2)
    load_checkpoint(path, third, third_opt)
    assert torch.equal(_step(other, other_opt, 12), _step(third, third_opt, 12))


def test_a_shape_mismatch_names_the_tensor(tmp_path) -> None:
    from mixlab.train.checkpoint import CheckpointError

    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    wider = build_model(ModelConfig(name="t", vocab_size=64, d_model=16, n_layers=3, pattern="A", d_intermediate=48))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch layers\.0\.mlp\.\w+\.weight: checkpoint \[\d+, \d+\] vs model"
    ):
        load_checkpoint(path, wider)


def test_the_launcher_environment_is_read_from_torchrun_or_an_srun_step(monkeypatch) -> None:
    import os

    from mixlab.train.distributed import detect_launch

    # set, then delete: monkeypatch then removes whatever detect_launch exports for torch
    launch_keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"]
    for k in [k for k in os.environ if k.startswith("SLURM_")] + launch_keys:
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    assert detect_launch().launcher == "single"
    # the batch script itself carries SLURM_PROCID=0 of an 8-task allocation: still one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert detect_launch().world_size == 1
    # an srun step of 8 tasks, 4 per node: this is rank 5, the second of node 1
    for k, v in {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                 "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set; export it in the batch script"):
        detect_launch()
    monkeypatch.setenv("MASTER_ADDR", "node001")
    env = detect_launch()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (5, 8, 1, 4, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_PORT"] == "29500"
    # torchrun's variables win
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "0")
    env = detect_launch()
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 4, 3)


def test_training_takes_expandable_segments_unless_the_allocator_is_configured(monkeypatch) -> None:
    from mixlab.train.parallel import TRAINING_ALLOC_CONF, training_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert training_allocator() and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == TRAINING_ALLOC_CONF
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert not training_allocator() and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"
