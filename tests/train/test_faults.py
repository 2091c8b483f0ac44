"""Failure paths of multi-process training: a stuck rank produces the hang diagnostic within its
timeout (two CPU processes on gloo through torchrun), and SIGTERM to a training process leaves a
checkpoint and a clean exit."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mixlab.train import read_metrics
from mixlab.train.checkpoint import list_checkpoints, verify_checkpoint


def _worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dist_worker", Path(__file__).with_name("dist_worker.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker()


def test_a_stuck_rank_produces_the_hang_diagnostic_within_its_timeout(tmp_path) -> None:
    helpers = W.conftest()
    make_corpus, tiny_overrides = helpers.make_corpus, helpers.tiny_overrides
    make_corpus(tmp_path / "corpus")
    timeout = 3
    over = [*tiny_overrides(tmp_path), "train.max_steps=10", "train.save_every=0", "train.export=false"]
    over += [f"run.dir={tmp_path / 'run'}", "parallel.strategy=ddp", f"parallel.timeout_s={timeout}"]
    t0 = time.monotonic()
    proc = W.launch("train", [{"overrides": over, "stall": "1:2"}], tmp_path / "out", timeout=120)
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # rank 0 waits in the gradient all-reduce of step 3 and fails after the timeout, saying what to check
    m = re.search(r"rank 0/2 on \S+: a collective failed \(.*\) in train step \(step 3\) after ([\d.]+) s", log)
    assert m, log[-4000:]
    assert float(m.group(1)) < timeout + 2
    assert f"parallel.timeout_s={timeout}" in log and "module system" in log and "NCCL_SOCKET_IFNAME" in log
    # the stuck rank's own watchdog reports where it is, with its Python stack, and ends the process
    m = re.search(r"HANG: rank 1/2 on \S+: no progress in train step \(step 3\) after ([\d.]+) s", log)
    assert m, log[-4000:]
    assert float(m.group(1)) < timeout + 2
    assert "dist_worker.py" in log.split("HANG: rank 1/2", 1)[1]  # the stack names where it sleeps
    assert "exiting with code 3" in log
    assert elapsed < 90


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny) -> None:
    run_dir = tiny.root / "sig"
    cmd = [sys.executable, "-m", "mixlab", "train", *tiny.overrides, f"run.dir={run_dir}"]
    cmd += ["train.max_steps=100000", "train.save_every=0", "train.eval_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any("tokens_per_s" in r and r["step"] >= 3 for r in read_metrics(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "received SIGTERM" in err
    assert "stopped by SIGTERM after step" in out + err and "train.resume=auto" in out + err
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert len(ckpts) == 1
    step = verify_checkpoint(ckpts[0])["step"]
    assert step >= 3 and max(r["step"] for r in read_metrics(run_dir) if "tokens_per_s" in r) == step
    assert proc.returncode == 130  # the CLI's code for a run that stopped before max_steps
