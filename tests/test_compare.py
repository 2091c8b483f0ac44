"""``mixlab compare``: the grid, experiment files, a tiny 2-run comparison and its report, which
opens in headless Chromium without errors (the screenshot is kept as a test artifact)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mixlab.cli import main
from mixlab.compare import expand_grid, flatten_overrides, load_experiment, parse_vary

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


def test_parse_vary_and_grid(tmp_path) -> None:
    vary = parse_vary(["model=transformer-tiny,mamba-tiny", "train.lr=1e-3,1e-4", "train.betas=[0.9,0.95],[0.9,0.99]"])
    assert vary["train.betas"] == ["[0.9,0.95]", "[0.9,0.99]"]
    runs = expand_grid(vary, ["train.max_steps=5"], tmp_path)
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].varied == {"model": "transformer-tiny", "train.lr": "1e-3", "train.betas": "[0.9,0.95]"}
    assert runs[0].overrides[0] == "train.max_steps=5" and f"run.dir={runs[0].run_dir}" in runs[0].overrides
    gpus = expand_grid({"gpus": ["1", "4"]}, [], tmp_path)
    assert [r.gpus for r in gpus] == [1, 4]
    assert "parallel.strategy=ddp" in gpus[1].overrides and not any(o.startswith("gpus") for o in gpus[1].overrides)
    with pytest.raises(ValueError, match="both varied and set"):
        expand_grid({"train.lr": ["1e-3"]}, ["train.lr=1e-2"], tmp_path)
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_vary(["model"])
    with pytest.raises(ValueError, match="repeated"):
        parse_vary(["train.lr=1,1"])
    assert flatten_overrides({"train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "task": "mqar"}) == [
        "train.lr=0.001",
        "train.betas=[0.9, 0.95]",
        "task=mqar",
    ]


def test_shipped_experiments_resolve_scaled_down_and_full() -> None:
    from mixlab.configio import load_config

    files = sorted(EXPERIMENTS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"architectures", "lr_sweep", "seq_len", "gpus"}
    for f in files:
        for full in (False, True):
            exp = load_experiment(f, full=full)
            runs = expand_grid(exp["vary"], exp["base"], "/tmp/unused")
            assert runs, f
            for r in runs:
                load_config(None, r.overrides)  # every run's configuration is valid
    small = load_experiment(EXPERIMENTS / "lr_sweep.yaml")
    assert small["vary"]["train.lr"] == ["1e-3", "1e-4", "1e-5"]
    full = load_experiment(EXPERIMENTS / "architectures.yaml", full=True)
    assert any("report-" in m for m in full["vary"]["model"])
    seq = load_experiment(EXPERIMENTS / "seq_len.yaml", full=True)
    assert seq["vary"]["data.seq_len"] == ["1024", "2048", "4096"]


def test_experiment_file_errors(tmp_path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("vary: {model: [a]}\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_experiment(f)
    f.write_text("vary: {model: [a]}\n")
    with pytest.raises(ValueError, match="no 'full:' section"):
        load_experiment(f, full=True)


def _corpus(d: Path) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "(", ")", "def", "x", "\n", "return"]
    d.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (d / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(80)))
    return d


BASE = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.d_intermediate=64",
    "model.attention.n_heads=2",
    "model.deltanet.n_heads=2",
    "model.deltanet.head_dim=16",
    "data.seq_len=32",
    "data.val_min_tokens=300",
    "train.batch_size=4",
    "train.max_steps=3",
    "train.eval_every=0",
    "log.progress=false",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    corpus = _corpus(root / "corpus")
    out = root / "out"
    args = ["compare", "--out", str(out), "--vary", "model=transformer-tiny,deltanet-tiny"]
    args += ["data.seq_len=999", *BASE, f"data.source={corpus}", f"data.cache_dir={root / 'cache'}"]
    assert main(args) == 0
    return out, args


def test_tiny_compare_writes_the_report(report, capsys) -> None:
    out, args = report
    for name in ("report.md", "report.html", "summary.json", "loss_vs_step.png", "loss_vs_time.png",
                 "tokens_per_s.png", "params.png", "eval_ppl.png"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert [r["varied"] for r in runs] == [{"model": "transformer-tiny"}, {"model": "deltanet-tiny"}]
    assert all(r["status"] == "completed" and r["steps"] == 3 and r["params"] > 0 for r in runs)
    assert all(r["eval"]["ppl"]["ppl"] > 1 for r in runs)
    # the runs differ only in what is varied (and where they live)
    cfgs = [yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text()) for r in runs]
    for c in cfgs:
        c.pop("model"), c["run"].pop("dir"), c["run"].pop("name")
    assert cfgs[0] == cfgs[1]
    md = (out / "report.md").read_text()
    assert "| transformer-tiny |" in md and "![" in md and "deltanet-tiny" in md
    assert "`data.seq_len=32`" in md and "data.seq_len=999" not in md.split("Shared by every run")[1]  # effective
    assert "mixlab compare --vary model=transformer-tiny,deltanet-tiny --out" in md  # the command that made it
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5
    assert not re.search(r'(?:src|href)="(?!data:)', page), "the page must not reference external assets"
    # a second call reuses the finished runs
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("already finished") == 2


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || (e.target && e.target.src))); }, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.body.setAttribute("data-probe", JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors}));
});
</script>"""


def test_report_opens_in_headless_chromium(report, tmp_path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (apt-get install chromium)")
    out, _ = report
    page = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    m = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert m, f"the page did not finish loading: {dom.stderr[-2000:]}"
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result["images"] >= 5 and result["broken"] == 0 and result["errors"] == [], result
    artifacts = Path(os.environ.get("MIXLAB_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "compare-report.png"
    subprocess.run(
        [*flags, "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_gpus_pseudo_key_runs_ddp_through_torchrun_with_identical_losses(tmp_path) -> None:
    """`--vary gpus=1,2` (here on CPU processes over gloo): the 2-process run takes the same global
    batches, so its losses equal the single-process run's."""
    corpus = _corpus(tmp_path / "corpus")
    args = ["compare", "--out", str(tmp_path / "out"), "--vary", "gpus=1,2", "--eval", "none"]
    args += ["model=transformer-tiny", *BASE, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main([*args, "run.device=cpu"]) == 0
    runs = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert [r["varied"] for r in runs] == [{"gpus": "1"}, {"gpus": "2"}]
    one, two = ([p[2] for p in r["curve"]] for r in runs)
    assert len(one) == 3 and one == pytest.approx(two, rel=1e-4)
    cfg = yaml.safe_load((Path(runs[1]["run_dir"]) / "config.yaml").read_text())
    assert cfg["parallel"]["strategy"] == "ddp"
