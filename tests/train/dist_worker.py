"""A torchrun worker for the distributed tests: trains a list of runs, optionally injecting faults.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_worker.py SPEC.json OUT_DIR

SPEC.json holds ``{"init": "worker" | "train", "runs": [...]}``, each run ``{"overrides": [...],
"stall": "RANK:STEP", "signal": "RANK:STEP:SIGTERM"}``: ``stall`` makes that rank hang (sleep) when
it loads the batch of 0-based ``STEP``; ``signal`` makes that rank send itself the signal there.
``init``: ``worker`` creates the gloo process group once and every run uses it (a process group
cannot be created twice from torchrun's environment); ``train`` lets ``train`` create it (one run).
Each rank writes ``OUT_DIR/run{i}-rank{r}.json`` with the run's status, step, losses, checkpoint
and message.

The test files load this file as a module for :func:`launch` (and :func:`conftest`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType


def launch(init: str, runs: list[dict], out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """torchrun 2 CPU workers of this file (in their own session, killed whole on timeout)."""
    import pytest

    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({"init": init, "runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [__file__, str(out / "spec.json"), str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def conftest() -> ModuleType:
    """This folder's conftest (``make_corpus``, ``tiny_overrides``) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = int(os.environ["RANK"])

    import torch.distributed as dist

    from mixlab.configio import load_config
    from mixlab.data.loader import TrainLoader
    from mixlab.train import train

    real_batch = TrainLoader.batch
    if spec["init"] == "worker":
        dist.init_process_group("gloo")
    for i, run in enumerate(spec["runs"]):
        stall = run.get("stall")
        sig = run.get("signal")

        def batch(self, step, _stall=stall, _sig=sig):
            if _stall and [rank, step] == [int(x) for x in _stall.split(":")]:
                time.sleep(3600)
            if _sig:
                r, s, name = _sig.split(":")
                if [rank, step] == [int(r), int(s)]:
                    os.kill(os.getpid(), getattr(signal, name))
            return real_batch(self, step)

        TrainLoader.batch = batch
        result = train(load_config(None, run["overrides"]), log=lambda m: print(m, flush=True))
        doc = {
            "status": result.status,
            "step": result.step,
            "losses": {str(k): v for k, v in result.losses.items()},
            "val_loss": result.val_loss,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "message": result.message,
            "world_size": result.world_size,
        }
        (out / f"run{i}-rank{rank}.json").write_text(json.dumps(doc))
    if spec["init"] == "worker":
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
