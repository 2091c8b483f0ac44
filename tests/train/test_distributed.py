"""Two CPU processes on gloo through torchrun: DDP and FSDP match one process on the same global batch,
FSDP exports one safetensors file, checkpoints saved on 2 ranks resume on 1, and preemption stops
every rank at the same step with a checkpoint. (Hangs and SIGTERM: test_faults.py.)

One torchrun launch trains all the two-rank runs (start-up dominates on a 2-core machine)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mixlab.train import read_metrics, train
from mixlab.train.checkpoint import list_checkpoints, read_model_state, verify_checkpoint

STEPS = 20


def _quiet(_msg: str) -> None:
    pass


def _worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dist_worker", Path(__file__).with_name("dist_worker.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker()


def _result(out: Path, i: int, rank: int) -> dict:
    return json.loads((out / f"run{i}-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference and three two-rank runs on one process group made by the
    caller (DDP; FSDP with accumulation and selective activation checkpointing; DDP preempted by
    SIGTERM on rank 1 while it loads the batch of step 5)."""
    helpers = W.conftest()
    make_corpus, tiny_overrides = helpers.make_corpus, helpers.tiny_overrides
    root = tmp_path_factory.mktemp("dist")
    make_corpus(root / "corpus")
    base = [*tiny_overrides(root), f"train.max_steps={STEPS}", "train.eval_every=10", "train.save_every=10"]
    out = root / "out"
    spec = [
        {"overrides": [*base, f"run.dir={root / 'ddp'}", "parallel.strategy=ddp"]},
        {
            "overrides": [
                *base,
                f"run.dir={root / 'fsdp'}",
                "parallel.strategy=fsdp",
                "train.micro_batch_size=1",
                "train.activation_checkpointing=selective",
            ]
        },
        {
            "overrides": [*base, f"run.dir={root / 'preempt'}", "parallel.strategy=ddp", "train.export=false"],
            "signal": "1:4:SIGTERM",
        },
    ]
    proc = W.launch("worker", spec, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref = train(load(base, f"run.dir={root / 'ref'}"), log=_quiet)
    return {"root": root, "base": base, "out": out, "ref": ref, "log": proc.stdout + proc.stderr}


def load(base: list[str], *extra: str):
    from mixlab.configio import load_config

    return load_config(None, [*base, *extra])


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])


def test_ddp_and_fsdp_match_one_process_on_the_same_global_batch(runs) -> None:
    ref = runs["ref"]
    assert sorted(ref.losses) == list(range(1, STEPS + 1))
    for i, name in ((0, "ddp"), (1, "fsdp")):
        r0, r1 = _result(runs["out"], i, 0), _result(runs["out"], i, 1)
        assert r0["status"] == r1["status"] == "completed" and r0["world_size"] == 2, name
        losses = {int(k): v for k, v in r0["losses"].items()}
        assert losses == {int(k): v for k, v in r1["losses"].items()}  # every rank reports the global mean
        _close(losses, ref.losses, range(1, STEPS + 1))
        assert r0["val_loss"] == pytest.approx(ref.val_loss, rel=1e-5), name  # eval averaged over ranks
        assert losses[STEPS] < losses[1] - 1.0  # it learned
    # metrics are written once (rank 0), one row per step
    rows = [r for r in read_metrics(runs["root"] / "fsdp") if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # the start-up line of the node, and the micro-batch split of the global batch
    assert re.search(
        r"mixlab dist: host \S+ node 0 ranks 0-1 of 2 \(torchrun\).*backend gloo.*MASTER_ADDR=", runs["log"]
    )
    assert "4 seqs x 32 tokens (2 per rank, 2 micro-batches of 1)" in runs["log"]


def test_fsdp_export_is_one_safetensors_file_equal_to_the_gathered_shards(runs) -> None:
    import torch

    from mixlab.train import load_model

    run = runs["root"] / "fsdp"
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    doc = verify_checkpoint(ckpt)
    assert doc["format"] == "dcp-v1" and doc["world_size"] == 2
    names = sorted(doc["files"])
    assert "model-rank00000-of-00002.safetensors" in names and "optimizer-rank00001-of-00002.safetensors" in names
    model, _ = load_model(run)  # the export: config.json + one model.safetensors
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["model.safetensors"]
    shards = read_model_state(ckpt)  # the two ranks' shards put together
    state = model.state_dict()
    assert set(shards) == set(state) - {"lm_head.weight"}  # tied to embed.weight, stored once
    for k, v in shards.items():
        assert torch.equal(v, state[k]), k


def test_checkpoint_saved_on_two_ranks_resumes_on_one_and_continues_identically(runs) -> None:
    root, ref = runs["root"], runs["ref"]
    two = {int(k): v for k, v in _result(runs["out"], 1, 0)["losses"].items()}
    resumed = root / "fsdp-resumed"
    shutil.copytree(root / "fsdp" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    msgs: list[str] = []
    res = train(load(runs["base"], f"run.dir={resumed}"), log=msgs.append)  # strategy none, one process
    assert any("resuming from" in m and "saved on 2 rank(s), resumed on 1" in m for m in msgs), msgs
    assert res.start_step == 10 and sorted(res.losses) == list(range(11, STEPS + 1))
    _close(res.losses, two, range(11, STEPS + 1))
    _close(res.losses, ref.losses, range(11, STEPS + 1))
    assert res.val_loss == pytest.approx(ref.val_loss, rel=1e-5)


def test_preemption_stops_every_rank_at_the_same_step_with_a_checkpoint(runs) -> None:
    root, ref = runs["root"], runs["ref"]
    r0, r1 = _result(runs["out"], 2, 0), _result(runs["out"], 2, 1)
    # rank 1 got SIGTERM while loading step 5's batch; both ranks finish step 5, save it and stop
    assert r0["status"] == r1["status"] == "preempted" and r0["step"] == r1["step"] == 5
    assert "SIGTERM" in r1["message"] and "other rank" in r0["message"] and "train.resume=auto" in r0["message"]
    ckpts = list_checkpoints(root / "preempt" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000005"] and verify_checkpoint(ckpts[0])["step"] == 5
    assert not (root / "preempt" / "model.safetensors").exists()  # no export of an unfinished run
    assert any(r.get("event") == "preempted" for r in read_metrics(root / "preempt"))
    # the preemption checkpoint (2 ranks, DDP) continues on one process exactly as the reference
    res = train(load(runs["base"], f"run.dir={root / 'preempt'}", "train.export=false"), log=_quiet)
    assert res.start_step == 5
    _close(res.losses, ref.losses, range(6, STEPS + 1))
