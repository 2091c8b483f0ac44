"""The lm-eval adapter: log-likelihoods against direct computation, and toy tasks from local JSONL
run through ``lm_eval.simple_evaluate`` offline. Skipped when lm-eval is not installed."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixlab import build_model, get_preset
from mixlab.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_missing_lm_eval_names_the_install(monkeypatch) -> None:
    from mixlab.eval import harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        harness.require_lm_eval()


lm_eval = pytest.importorskip("lm_eval")
from mixlab.eval.harness import HarnessDataError, MixlabLM, evaluate_harness  # noqa: E402


def _req(*args):
    return SimpleNamespace(args=args)


def _model(uniform: bool = False, vocab: int = 320) -> nn.Module:
    cfg = get_preset("transformer-tiny")
    cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_intermediate, cfg.tie_embeddings = 32, 2, vocab, 64, False
    cfg.attention.n_heads = 2
    torch.manual_seed(0)
    m = build_model(cfg, dtype=torch.float64).eval()
    if uniform:
        with torch.no_grad():
            m.lm_head.weight.zero_()
    return m


class Bigram(nn.Module):
    def __init__(self, V: int = 320) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.table = nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64).log_softmax(-1))

    def forward(self, ids, cache=None):
        return self.table[ids]


def test_loglikelihood_matches_a_direct_forward_including_truncation() -> None:
    model = _model()
    lm = MixlabLM(model, TOK, max_length=16, batch_size=3)
    reqs = [("The cat sat on the", " mat"), ("Q: ", "yes"), ("", "abc"), ("x" * 40, " long tail"), ("a", "b")]
    got = lm.loglikelihood([_req(*r) for r in reqs])
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        if ctx.endswith(" "):  # trailing whitespace moves to the continuation
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()) :] + cont
        c = TOK.encode(ctx) or [TOK.eos_id]
        t = TOK.encode(cont)
        full = (c + t)[-17:]
        x = torch.tensor([full[:-1]])
        with torch.no_grad():
            logp = F.log_softmax(model(x), -1)[0, -len(t) :]
        ref = float(logp.gather(1, torch.tensor(t)[:, None]).sum())
        assert ll == pytest.approx(ref, rel=1e-9, abs=1e-9)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(t)).all())


def test_uniform_and_bigram_log_likelihoods_by_hand() -> None:
    V = 320
    lm = MixlabLM(_model(uniform=True), TOK, max_length=8)
    (ll, greedy), (ll2, _) = lm.loglikelihood([_req("Question:", " answer"), _req("", "abc")])
    assert ll == pytest.approx(-7 * math.log(V)) and not greedy
    assert ll2 == pytest.approx(-3 * math.log(V))
    text = "rolling windows over twenty-nine bytes"
    (roll,) = lm.loglikelihood_rolling([_req(text)])
    assert roll == pytest.approx(-len(text) * math.log(V))
    # a bigram model: every token scored exactly once, after its true predecessor (EOS first)
    bigram = Bigram(V)
    lm = MixlabLM(bigram, TOK, max_length=8, batch_size=2)
    ids = [TOK.eos_id, *TOK.encode(text)]
    ref = sum(float(bigram.table[a, b].detach()) for a, b in itertools.pairwise(ids))
    assert lm.loglikelihood_rolling([_req(text)])[0] == pytest.approx(ref, rel=1e-9)


class Echo(nn.Module):
    """Answers ``ECHO <word>`` prompts by spelling `` <word>`` then a newline (byte tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=257)

    def init_cache(self, batch, max_len, device=None, dtype=None):
        return SimpleNamespace(hist=[[] for _ in range(batch)])

    def forward(self, ids, cache=None):
        B, T = ids.shape
        out = torch.zeros(B, T, 257)
        for b in range(B):
            cache.hist[b].extend(ids[b].tolist())
            text = bytes(t for t in cache.hist[b] if t < 256).decode()
            m = list(re.finditer(r"ECHO (\w+)\nA:", text))
            nxt = "\n"
            if m:
                answer, done = " " + m[-1].group(1) + "\n", len(text) - m[-1].end()
                nxt = answer[done] if done < len(answer) else "\n"
            out[b, -1, ord(nxt)] = 10.0
        return out


def _write_tasks(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {"q": "Pick one:", "choices": [" no", " maybe", " certainly not"], "answer": 0},
                {"q": "Again:", "choices": [" longest answer", " ok"], "answer": 1},
            ]
        )
    )
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text("\n".join(json.dumps({"text": t}) for t in ["Some held-out text.", "Another document here."]))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("\n".join(json.dumps({"word": w}) for w in ["alpha", "bravo", "charlie"]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: train\n"
    (tasks / "mc.yaml").write_text(
        f"task: mixlab_toy_mc\n{common}dataset_kwargs:\n  data_files: {mc}\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (tasks / "ppl.yaml").write_text(
        f"task: mixlab_toy_ppl\n{common}dataset_kwargs:\n  data_files: {ppl}\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / "gen.yaml").write_text(
        f"task: mixlab_toy_gen\n{common}dataset_kwargs:\n  data_files: {gen}\noutput_type: generate_until\n"
        'doc_to_text: "ECHO {{word}}\\nA:"\ndoc_to_target: " {{word}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (tasks / "hub.yaml").write_text(
        "task: mixlab_toy_hub\ndataset_path: mixlab-nonexistent-org/nonexistent-dataset\ntest_split: test\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: byte_perplexity\n"
    )
    return tasks


def test_toy_tasks_from_local_jsonl_through_simple_evaluate(tmp_path) -> None:
    tasks = _write_tasks(tmp_path)
    V = 320
    uniform = MixlabLM(_model(uniform=True), TOK, max_length=64)
    res = evaluate_harness(uniform, ["mixlab_toy_mc", "mixlab_toy_ppl"], include_path=str(tasks))
    # a uniform byte model picks the shortest choice, the right one in both documents
    assert res["mixlab_toy_mc"]["acc,none"] == pytest.approx(1.0)
    assert res["mixlab_toy_ppl"]["byte_perplexity,none"] == pytest.approx(V, rel=1e-6)
    assert res["mixlab_toy_ppl"]["bits_per_byte,none"] == pytest.approx(math.log2(V), rel=1e-6)
    echo = MixlabLM(Echo(), TOK, max_length=64)
    res = evaluate_harness(echo, ["mixlab_toy_gen"], include_path=str(tasks))
    assert res["mixlab_toy_gen"]["exact_match,none"] == pytest.approx(1.0)


def test_unknown_task_and_missing_data_are_explained(tmp_path) -> None:
    tasks = _write_tasks(tmp_path)
    lm = MixlabLM(_model(uniform=True), TOK, max_length=32)
    with pytest.raises(ValueError, match=r"unknown lm-eval task.*mixlab_toy_mcq"):
        evaluate_harness(lm, ["mixlab_toy_mcq"], include_path=str(tasks), include_defaults=False)
    with pytest.raises(HarnessDataError, match="not in the local Hugging Face cache"):
        evaluate_harness(lm, ["mixlab_toy_hub"], include_path=str(tasks))


def test_yaml_parses(tmp_path) -> None:  # the fixture's YAML is what the harness reads
    import yaml

    tasks = _write_tasks(tmp_path)
    for f in tasks.glob("*.yaml"):
        assert "task" in yaml.safe_load(textwrap.dedent(f.read_text()))
