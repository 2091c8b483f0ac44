"""`mixlab bench train --quick` on the CPU: rows, the FLOPs formula, OOM skipping, targets, files."""

from __future__ import annotations

import json

import pytest
import torch

import mixlab.bench.train as bt
from mixlab.cli import main
from mixlab.models import get_preset


def _results(tmp_path) -> dict:
    files = sorted(tmp_path.glob("train-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_quick_run_writes_rows_with_the_stated_flops_and_a_table(tmp_path, capsys) -> None:
    args = ["bench", "train", "--quick", "--shapes", "32x2", "--out-dir", str(tmp_path), "--long"]
    assert main(args) == 0
    data = _results(tmp_path)
    rows = {(r["preset"], r["seq_len"], r["batch"]): r for r in data["rows"]}
    # the two quick presets at 32x2, and --long's Gated DeltaNet and Transformer of the same size at 512x1
    assert set(rows) == {
        ("transformer-tiny", 32, 2),
        ("gated_deltanet-tiny", 32, 2),
        ("gated_deltanet-tiny", 512, 1),
        ("transformer-tiny", 512, 1),
    }
    for (preset, seq, _), r in rows.items():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and len(r["step_ms_all"]) == 2, r
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1e3))
        cfg = get_preset(preset)
        dense = 6 * (r["params_non_embedding"] + cfg.vocab_size * cfg.d_model)
        n_attn = sum(letter in "AS" for letter in cfg.layer_types)
        head_dim = cfg.d_model // cfg.attention.n_heads
        assert r["flops_per_token"] == pytest.approx(dense + n_attn * 6 * seq * cfg.attention.n_heads * head_dim)
        assert "mfu" not in r  # no peak FLOP/s known for a CPU
    assert rows[("transformer-tiny", 32, 2)]["vs_transformer"] == 1.0
    assert "flops/token = 6*(non-embedding params + vocab*d_model)" in data["flops_formula"]
    out = capsys.readouterr().out
    table = out.split("preset ", 1)[1]
    assert "tokens_per_s" in table and "gated_deltanet-tiny" in table
    assert "512 x 1: gated_deltanet-tiny" in out and "results:" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert len(list(tmp_path.glob("train-*.png"))) == 1 and "plot:" in out.splitlines()[-1]


def test_an_out_of_memory_point_is_recorded_and_skipped(tmp_path, monkeypatch, capsys) -> None:
    real = bt._measure

    def fake(row, cfg, *a, **k):
        if cfg.name == "gated_deltanet-tiny":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        if cfg.name == "transformer-tiny" and row["seq_len"] == 16:
            raise RuntimeError("some kernel failed")
        return real(row, cfg, *a, **k)

    monkeypatch.setattr(bt, "_measure", fake)
    args = ["bench", "train", "--quick", "--shapes", "16x1,32x1", "--out-dir", str(tmp_path), "--no-plot"]
    assert main(args) == 0
    rows = {(r["preset"], r["seq_len"]): r for r in _results(tmp_path)["rows"]}
    assert rows[("gated_deltanet-tiny", 16)]["status"] == rows[("gated_deltanet-tiny", 32)]["status"] == "oom"
    assert rows[("transformer-tiny", 16)]["status"] == "error"
    assert rows[("transformer-tiny", 16)]["error"] == "RuntimeError: some kernel failed"
    assert rows[("transformer-tiny", 32)]["status"] == "ok"
    assert "oom" in capsys.readouterr().out


def test_targets_and_shapes() -> None:
    def row(preset, seq, batch, tps):
        return {"preset": preset, "arch": preset.rsplit("-", 1)[0], "seq_len": seq, "batch": batch,
                "status": "ok", "tokens_per_s": tps, "size": "1.3b"}  # fmt: skip

    rows = [
        row("transformer-1.3b", 2048, 16, 56e3),
        row("transformer-1.3b", 8192, 4, 40e3),
        row("gated_deltanet-1.3b", 4096, 8, 49e3),
        row("gated_deltanet-1.3b", 8192, 4, 48e3),
        row("mamba2-1.3b", 8192, 4, 39e3),
    ]
    bt.add_ratios(rows)
    targets = {t["target"]: t["pass"] for t in bt.check_targets(rows)}
    assert targets == {
        "gated_deltanet-1.3b >= 50K tokens/s at 4096x8": False,
        "transformer-1.3b >= 55K tokens/s at 2048x16": True,
        "gated_deltanet-1.3b faster than transformer-1.3b at 8192x4": True,
        "mamba2-1.3b faster than transformer-1.3b at 8192x4": False,
    }
    assert bt.parse_shapes("2048x16, 4kx8,16Kx2") == [(2048, 16), (4096, 8), (16384, 2)]
    with pytest.raises(ValueError, match="expected SEQxBATCH"):
        bt.parse_shapes("2048*16")


def test_a_lost_cuda_context_skips_the_rest_and_isolate_runs_each_point_in_its_own_process(
    tmp_path, monkeypatch, capsys
) -> None:
    def crash(row, cfg, *a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bt, "_measure", crash)
    rows = bt.run_suite(
        ["transformer-tiny", "gated_deltanet-tiny"],
        [(16, 1)],
        torch.device("cpu"),
        1,
        0,
        "none",
        False,
        None,
        None,
        None,
    )
    assert [r["status"] for r in rows] == ["error", "skipped"] and "--isolate" in rows[1]["error"]
    monkeypatch.undo()
    # --isolate: the point runs in a fresh `mixlab bench train` process and its row comes back
    rows = bt.run_suite(
        ["transformer-tiny"], [(16, 1)], torch.device("cpu"), 1, 0, "none", False, None, None, None, isolate=True
    )
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["tokens_per_s"] > 0 and rows[0]["seq_len"] == 16


def test_an_oom_point_can_be_retried_with_activation_checkpointing(monkeypatch) -> None:
    real = bt._measure

    def fake(row, cfg, *a, **k):
        if row["activation_checkpointing"] == "none" and cfg.name == "gated_deltanet-tiny":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(row, cfg, *a, **k)

    monkeypatch.setattr(bt, "_measure", fake)
    presets = ["transformer-tiny", "gated_deltanet-tiny"]
    rows = bt.run_suite(
        presets, [(16, 1)], torch.device("cpu"), 1, 0, "none", False, None, None, None, oom_retry_ac="full"
    )
    assert [(r["preset"], r["status"], r["activation_checkpointing"]) for r in rows] == [
        ("transformer-tiny", "ok", "none"),
        ("gated_deltanet-tiny", "ok", "full"),
    ]
    assert rows[1]["oom_with_ac"] == "none" and "oom_with_ac" not in rows[0]


def test_ac_auto_checkpoints_more_blocks_until_a_point_fits(monkeypatch) -> None:
    real = bt._measure

    def fake(row, cfg, *a, **k):  # "fits" from 2 checkpointed blocks of 4 on
        if row["activation_checkpointing"] in ("none", "selective:1"):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(row, cfg, *a, **k)

    monkeypatch.setattr(bt, "_measure", fake)
    assert bt.ac_ladder("gated_deltanet-tiny", torch.device("cpu"), 16) == [
        "none", "selective:1", "selective:2", "selective:3", "full",
    ]  # fmt: skip
    rows = bt.run_suite(["gated_deltanet-tiny"], [(16, 1)], torch.device("cpu"), 1, 0, "auto", False, None, None, None)
    assert rows[0]["status"] == "ok" and rows[0]["activation_checkpointing"] == "selective:2"
    assert rows[0]["ac_tried"] == ["none", "selective:1", "selective:2"] and rows[0]["oom_with_ac"] == "none"


def test_ac_auto_skips_the_levels_the_estimate_rules_out(monkeypatch) -> None:
    monkeypatch.setattr(bt, "_blocks_needed", lambda preset, device, tokens: 13)
    ladder = bt.ac_ladder("gated_deltanet-1.3b", torch.device("cuda"), 32768)
    # 21 blocks in steps of 3: 12 blocks is the last level under the estimate; one level of margin below it
    assert ladder == ["selective:9", "selective:12", "selective:15", "selective:18", "full"]


def test_keep_states_auto_tries_kept_states_first_and_falls_back_on_oom(monkeypatch) -> None:
    """``keep_states="auto"``: where the estimate has room the point first runs with the delta-rule layers keeping
    their chunk states; out of memory, it runs again without them. The default, ``off``, never keeps them."""
    real = bt._measure
    seen = []

    def fake(row, cfg, *a, **k):
        seen.append((cfg.name, a[-1]))
        if a[-1]:  # keep_states
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(row, cfg, *a, **k)

    monkeypatch.setattr(bt, "_measure", fake)
    monkeypatch.setattr(bt, "_keep_states_fit", lambda preset, device, tokens: True)
    rows = bt.run_suite(
        ["gated_deltanet-tiny"], [(16, 1)], torch.device("cpu"), 1, 0, "none", False, None, None, None,
        keep_states="auto",
    )  # fmt: skip
    assert seen == [("gated_deltanet-tiny", True), ("gated_deltanet-tiny", False)]
    assert rows[0]["status"] == "ok" and rows[0]["keep_states"] == 0
    assert rows[0]["ac_tried"] == ["none + kept states", "none"]
    seen.clear()
    bt.run_suite(["gated_deltanet-tiny"], [(16, 1)], torch.device("cpu"), 1, 0, "none", False, None, None, None)
    assert seen == [("gated_deltanet-tiny", False)]  # the default: off


def test_keep_states_on_marks_the_delta_rule_layers_of_blocks_not_checkpointed(monkeypatch) -> None:
    from mixlab.ops._triton import chunk

    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "max_k": 0})  # keeping pays above it
    rows = bt.run_suite(
        ["gdn_h1-tiny", "transformer-tiny"], [(16, 1)], torch.device("cpu"), 1, 0, "none", False, None, None, None,
        keep_states="on",
    )  # fmt: skip
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["keep_states"] == 2 and rows[1]["keep_states"] == 0  # gdn_h1-tiny: G S G S


def test_keep_states_fit_counts_the_kept_bytes() -> None:
    """The estimate at the 1.3b widths (H100-sized memory): Gated DeltaNet-H1 keeps its 11 layers' states
    (about 1 GB each at 32K tokens) with room to spare, the all-Gated-DeltaNet preset (21 of them) does not,
    a preset without delta-rule layers never does, nor one whose forward is fused (K <= 128: keeping does not
    pay there)."""
    from mixlab.layers.deltanet import GatedDeltaNet

    layer = GatedDeltaNet(2048, n_heads=6, head_dim=256, expand_v=2.0, device="meta")
    assert layer.kept_state_bytes_per_token() == (256 * 512 / 64 + 512) * 6 * 2
    memory = 85e9
    assert bt.keep_states_fit("gdn_h1-1.3b", 32768, memory)
    assert not bt.keep_states_fit("gdn_h1-1.3b", 32768, 0.9 * memory)
    assert not bt.keep_states_fit("gated_deltanet-1.3b", 32768, memory)
    assert not bt.keep_states_fit("transformer-1.3b", 32768, 1e15)
    assert not bt.keep_states_fit("gated_deltanet-350m", 32768, 1e15)
    assert (
        layer.keeping_states_pays()
        and not GatedDeltaNet(64, n_heads=2, head_dim=128, device="meta").keeping_states_pays()
    )


def test_bad_ac_mode_is_refused(capsys) -> None:
    assert main(["bench", "train", "--quick", "--ac", "half", "--no-plot"]) == 2
    assert "--ac: activation checkpointing mode 'half'; allowed: none, full" in capsys.readouterr().out
    assert main(["bench", "train", "--quick", "--oom-retry-ac", "auto", "--no-plot"]) == 2
    assert "--oom-retry-ac: activation checkpointing mode 'auto'" in capsys.readouterr().out


def test_profile_attributes_a_steps_time_to_kernel_classes(tmp_path, capsys) -> None:
    args = ["bench", "train", "--quick", "--presets", "transformer-tiny", "--shapes", "32x2", "--profile",
            "--out-dir", str(tmp_path), "--no-plot"]  # fmt: skip
    assert main(args) == 0
    (row,) = _results(tmp_path)["rows"]
    prof = row["profile"]
    assert prof["top"] and prof["total_ms"] > 0
    assert abs(sum(prof["by_class"].values()) - prof["total_ms"]) < 1e-6 * max(1.0, prof["total_ms"])
    names = [name for name, _, _ in prof["top"]]
    assert any("mm" in n or "linear" in n for n in names)  # a training step runs matmuls
    assert "profile transformer-tiny 32x2" in capsys.readouterr().out


def test_kernel_classes() -> None:
    from mixlab.bench.train import kernel_class

    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_class("pytorch_flash::flash_bwd_kernel<...>") == "attention"
    assert kernel_class("_bwd_dqkwg_kernel") == "mixlab triton"
    assert kernel_class("triton_poi_fused_add_mul_0") == "inductor"
    assert kernel_class("void at::native::multi_tensor_apply_kernel<...>") == "optimizer"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, ...>") != "mixlab triton"


def test_annotations_are_told_from_kernels_with_a_hash_in_their_name() -> None:
    from mixlab.bench.train import _is_annotation

    assert _is_annotation("## Call CompiledFxGraph fabc ##") and _is_annotation("Optimizer.step#AdamW.step")
    assert not _is_annotation("void at::native::elementwise_kernel<128, 4, {lambda(int)#1}>(int, {lambda(int)#1})")
    assert not _is_annotation("_bwd_dqkwg_kernel")


def test_device_gaps_measure_idle_time_between_kernels() -> None:
    from types import SimpleNamespace

    from mixlab.bench.train import _device_gaps

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, end, dev=cuda):
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(start=start, end=end))

    # kernels (us): a [0, 100], b [50, 150] overlaps a, c [400, 500], d [510, 600]; a host op in the gap is ignored,
    # and so is a device-side annotation that spans kernels and the gaps between them
    events = [ev("c", 400, 500), ev("a", 0, 100), ev("host", 150, 400, cpu), ev("b", 50, 150), ev("d", 510, 600)]
    events.append(ev("## Call CompiledFxGraph f0 ##", 0, 600))
    lam = "void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<{lambda(int)#1}>>(int, {lambda(int)#1})"
    events.append(ev(lam, 200, 300))  # a kernel whose name has a '#': it fills part of the gap before c
    gaps = _device_gaps(SimpleNamespace(events=lambda: events), min_us=20.0)
    assert gaps["span_ms"] == pytest.approx(0.6)
    assert gaps["busy_ms"] == pytest.approx(0.44)  # [0, 150] + [200, 300] + [400, 500] + [510, 600]
    assert gaps["idle_ms"] == pytest.approx(0.16)
    assert gaps["idle_gaps_ms"] == pytest.approx(0.15)  # the 10 us gap before d is below min_us
    assert gaps["gaps"] == [[pytest.approx(0.1), lam[:80], "c"], [pytest.approx(0.05), "b", lam[:80]]]


def test_ops_by_device_time_attributes_kernels_to_their_launching_op() -> None:
    """A synthetic Chrome trace: kernels go to the innermost host op around their launch (by correlation id), with
    the op's input dims; two launches of one op and shape add up; a kernel without a known launch is kept apart."""
    from mixlab.bench.train import ops_by_device_time

    def op(name, ts, dur, dims=None, tid=1):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {"Input Dims": dims} if dims else {}}  # fmt: skip

    def launch(corr, ts, tid=1, cat="cuda_runtime"):
        return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
                "args": {"correlation": corr}}  # fmt: skip

    def kernel(name, corr, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 1000 + corr, "dur": dur, "tid": 7,
                "args": {"correlation": corr}}  # fmt: skip

    events = [
        op("Optimizer.step", 0, 500),  # an outer op: the inner ones take their kernels
        op("aten::mm", 10, 20, [[32768, 2048], [2048, 6]]),
        op("aten::mm", 40, 20, [[32768, 2048], [2048, 6]]),
        op("aten::mm", 70, 20, [[32768, 2048], [2048, 6144]]),
        op("mixlab::lean_bwd", 100, 50, [[8, 4096, 6208]]),
        launch(1, 15),
        launch(2, 45),
        launch(3, 75),
        launch(4, 110, cat="cuda_driver"),
        launch(5, 300),
        kernel("gemm_small", 1, 150.0),
        kernel("gemm_small", 2, 150.0),
        kernel("gemm_big", 3, 1000.0),
        kernel("_triton_kernel", 4, 400.0),
        kernel("_fused_adamw", 5, 50.0),
        kernel("orphan", 99, 25.0),
    ]
    rows = ops_by_device_time({"traceEvents": events})
    assert rows == [
        ["aten::mm[[32768,2048],[2048,6144]]", pytest.approx(1.0), 1],
        ["mixlab::lean_bwd[[8,4096,6208]]", pytest.approx(0.4), 1],
        ["aten::mm[[32768,2048],[2048,6]]", pytest.approx(0.3), 2],
        ["Optimizer.step", pytest.approx(0.05), 1],
        ["(no launching op)", pytest.approx(0.025), 1],
    ]
    assert ops_by_device_time({"traceEvents": events}, top=2) == rows[:2]
