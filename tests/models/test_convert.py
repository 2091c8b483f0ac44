"""Checkpoint import/export: fla, mamba_ssm and Hugging Face Mamba/Mamba2 directories -> mixlab.

Oracles are independent of mixlab's layers: Hugging Face's own models (built at random with
``transformers`` on the CPU) and, for fla and mamba_ssm's attention/MLP blocks, small plain-torch
forwards written here from those projects' source, run on the same state dicts in float64.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mixlab.models.convert import CheckpointMismatchError, UnsupportedCheckpointError
from mixlab.models.hub import detect_format, from_pretrained, read_weights, save_pretrained

VOCAB, D = 48, 32


def _write(path, cfg: dict, state: dict, bin_file: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if bin_file:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    err = ((got - want).norm() / want.norm()).item()
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


# ----------------------------------------------------------------------------------------------
# plain-torch references written from the peers' source


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _conv_silu(x, w, act=True):
    """Causal depthwise conv as nn.Conv1d(groups=C, padding=W-1)[..., :T]: x [T, C], w [C, 1, W]."""
    t, width = x.shape[0], w.shape[-1]
    y = F.conv1d(x.T[None], w, padding=width - 1, groups=x.shape[1])[0, :, :t].T
    return F.silu(y) if act else y


def _rope(x, theta):
    """Rotate-half RoPE on x [T, H, Dh] at positions 0..T-1."""
    t, dh = x.shape[0], x.shape[-1]
    inv = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos = torch.cat([ang, ang], -1).cos()[:, None].to(x.dtype)
    sin = torch.cat([ang, ang], -1).sin()[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention(q, k, v, window=None):
    """Causal softmax attention, GQA, optional window: q [T, H, Dh], k/v [T, Hkv, Dh]."""
    t, h, dh = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("thd,shd->hts", q, k) * dh**-0.5
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    mask = j <= i
    if window:
        mask &= j > i - window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v)


def _fla_delta_layer(h, p, gated, use_gate, heads, eps):
    """fla's (Gated)DeltaNet layer, recurrent form, one sequence h [T, d]."""
    q = _conv_silu(h @ p["q_proj.weight"].T, p["q_conv1d.weight"])
    k = _conv_silu(h @ p["k_proj.weight"].T, p["k_conv1d.weight"])
    v = _conv_silu(h @ p["v_proj.weight"].T, p["v_conv1d.weight"])
    t = h.shape[0]
    q, k, v = q.view(t, heads, -1), k.view(t, heads, -1), v.view(t, heads, -1)
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(h @ p["b_proj.weight"].T)
    if gated:
        g = -p["A_log"].exp() * F.softplus(h @ p["a_proj.weight"].T + p["dt_bias"])
    S = torch.zeros(heads, q.shape[-1], v.shape[-1], dtype=h.dtype)
    outs = []
    for i in range(t):
        if gated:
            S = S * g[i].exp()[:, None, None]
        u = beta[i][:, None] * (v[i] - torch.einsum("hkv,hk->hv", S, k[i]))
        S = S + torch.einsum("hk,hv->hkv", k[i], u)
        outs.append(torch.einsum("hkv,hk->hv", S, q[i]) * q.shape[-1] ** -0.5)
    o = _rms(torch.stack(outs), p["o_norm.weight"], eps)
    if use_gate:
        o = o * F.silu(h @ p["g_proj.weight"].T).view(t, heads, -1)
    return o.reshape(t, -1) @ p["o_proj.weight"].T


def _fla_reference_logits(cfg: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    eps, gated = cfg["norm_eps"], cfg["model_type"] == "gated_deltanet"
    attn = cfg.get("attn") or {"layers": []}
    out = []
    for row in ids:
        x = sd["model.embeddings.weight"][row]
        for i in range(cfg["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            h = _rms(x, sd[pre + "attn_norm.weight"], eps)
            p = {k[len(pre + "attn.") :]: v for k, v in sd.items() if k.startswith(pre + "attn.")}
            if i in attn["layers"]:
                nh, nkv = attn["num_heads"], attn.get("num_kv_heads", attn["num_heads"])
                dh = cfg["hidden_size"] // nh
                q = _rope((h @ p["q_proj.weight"].T).view(-1, nh, dh), attn["rope_theta"])
                k = _rope((h @ p["k_proj.weight"].T).view(-1, nkv, dh), attn["rope_theta"])
                v = (h @ p["v_proj.weight"].T).view(-1, nkv, dh)
                o = _attention(q, k, v, attn.get("window_size")).reshape(len(row), -1) @ p["o_proj.weight"].T
            else:
                o = _fla_delta_layer(h, p, gated, cfg.get("use_gate", gated), cfg["num_heads"], eps)
            x = x + o
            h = _rms(x, sd[pre + "mlp_norm.weight"], eps)
            x = (
                x
                + (F.silu(h @ sd[pre + "mlp.gate_proj.weight"].T) * (h @ sd[pre + "mlp.up_proj.weight"].T))
                @ sd[pre + "mlp.down_proj.weight"].T
            )
        out.append(_rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T)
    return torch.stack(out)


def _fla_checkpoint(kind: str, attn: dict | None = None, use_gate: bool | None = None, seed: int = 0):
    """A random fla ``GatedDeltaNetForCausalLM`` / ``DeltaNetForCausalLM`` (config, state dict) in fla's key layout."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    heads, layers, inter = 2, 3, 64
    if kind == "gated_deltanet":
        head_k, head_v = 16, 32
        cfg = {"model_type": kind, "head_dim": head_k, "expand_v": 2.0, "use_gate": True}
    else:
        head_k, head_v = 16, 16
        cfg = {"model_type": kind, "expand_k": 1.0, "expand_v": 1.0, "use_gate": bool(use_gate)}
    cfg.update(
        hidden_size=D, num_hidden_layers=layers, num_heads=heads, vocab_size=VOCAB, norm_eps=1e-6, conv_size=4,
        intermediate_size=inter, tie_word_embeddings=False, attn=attn,
    )  # fmt: skip
    kd, vd = heads * head_k, heads * head_v
    sd = {"model.embeddings.weight": rnd(VOCAB, D, std=1.0), "model.norm.weight": 1 + rnd(D, std=0.1)}
    sd["lm_head.weight"] = rnd(VOCAB, D)
    for i in range(layers):
        pre = f"model.layers.{i}."
        sd[pre + "attn_norm.weight"] = 1 + rnd(D, std=0.1)
        sd[pre + "mlp_norm.weight"] = 1 + rnd(D, std=0.1)
        sd[pre + "mlp.gate_proj.weight"] = rnd(inter, D)
        sd[pre + "mlp.up_proj.weight"] = rnd(inter, D)
        sd[pre + "mlp.down_proj.weight"] = rnd(D, inter, std=0.1)
        a = pre + "attn."
        if attn and i in attn["layers"]:
            nkv = attn.get("num_kv_heads", attn["num_heads"])
            sd[a + "q_proj.weight"] = rnd(D, D)
            sd[a + "k_proj.weight"] = rnd(nkv * D // attn["num_heads"], D)
            sd[a + "v_proj.weight"] = rnd(nkv * D // attn["num_heads"], D)
            sd[a + "o_proj.weight"] = rnd(D, D, std=0.1)
            continue
        sd[a + "q_proj.weight"], sd[a + "k_proj.weight"] = rnd(kd, D), rnd(kd, D)
        sd[a + "v_proj.weight"], sd[a + "b_proj.weight"] = rnd(vd, D), rnd(heads, D)
        for c, n in (("q", kd), ("k", kd), ("v", vd)):
            sd[a + f"{c}_conv1d.weight"] = rnd(n, 1, 4, std=0.5)
        sd[a + "o_norm.weight"] = 1 + rnd(head_v, std=0.1)
        sd[a + "o_proj.weight"] = rnd(D, vd, std=0.1)
        if kind == "gated_deltanet":
            sd[a + "a_proj.weight"] = rnd(heads, D)
            sd[a + "A_log"] = torch.empty(heads, dtype=torch.float64).uniform_(1, 16, generator=g).log()
            sd[a + "dt_bias"] = rnd(heads, std=1.0)
        if cfg["use_gate"]:
            sd[a + "g_proj.weight"] = rnd(vd, D)
    return cfg, sd


@pytest.mark.parametrize(
    "kind, attn, use_gate",
    [
        ("gated_deltanet", None, None),
        (
            "gated_deltanet",
            {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 5, "rope_theta": 500.0},
            None,
        ),
        ("delta_net", None, False),
        ("delta_net", {"layers": [2], "num_heads": 2, "rope_theta": 10000.0}, True),
    ],
)
def test_fla_checkpoint_logits_match_fla_reference(tmp_path, kind, attn, use_gate):
    cfg, sd = _fla_checkpoint(kind, attn, use_gate)
    _write(tmp_path, cfg, {k: v.float() for k, v in sd.items()})
    assert detect_format(tmp_path) == f"fla_{'gated_deltanet' if kind == 'gated_deltanet' else 'deltanet'}"
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    want = _fla_reference_logits(cfg, {k: v.float().double() for k, v in sd.items()}, ids)
    model = from_pretrained(tmp_path, dtype=torch.float64, backend="reference")
    with torch.no_grad():
        _assert_close(model(ids), want, 1e-10)
    model32 = from_pretrained(tmp_path)  # float32, default backend
    with torch.no_grad():
        _assert_close(model32(ids).double(), want, 1e-4)


def test_mismatch_is_reported_tensor_by_tensor(tmp_path):
    cfg, sd = _fla_checkpoint("gated_deltanet")
    sd.pop("model.layers.1.attn.A_log")
    sd["model.layers.0.attn.extra_bias"] = torch.zeros(3)
    sd["model.layers.2.attn.o_norm.weight"] = torch.ones(7)
    _write(tmp_path, cfg, {k: v.float() for k, v in sd.items()})
    with pytest.raises(CheckpointMismatchError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing" in msg and "layers.1.mixer.A_log" in msg
    assert "unexpected" in msg and "model.layers.0.attn.extra_bias" in msg
    assert "wrong shape" in msg and "model.layers.2.attn.o_norm.weight" in msg and "[7]" in msg


def test_unsupported_settings_are_named(tmp_path):
    cfg, sd = _fla_checkpoint("gated_deltanet")
    cfg["allow_neg_eigval"] = True
    _write(tmp_path, cfg, {k: v.float() for k, v in sd.items()})
    with pytest.raises(UnsupportedCheckpointError, match="allow_neg_eigval"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedCheckpointError, match="unknown checkpoint format"):
        from_pretrained(tmp_path)


def test_mixlab_export_round_trip(tmp_path):
    from mixlab.config import AttentionConfig, GatedDeltaNetConfig, ModelConfig
    from mixlab.models import build_model

    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=D, n_layers=2, pattern="GS", d_intermediate=64,
        attention=AttentionConfig(n_heads=2, window=4), gated_deltanet=GatedDeltaNetConfig(n_heads=2, head_dim=16),
    )  # fmt: skip
    model = build_model(cfg)
    save_pretrained(model, tmp_path)
    assert detect_format(tmp_path) == "mixlab"
    import mixlab

    again = mixlab.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert "lm_head.weight" not in read_weights(tmp_path)  # tied: stored once


# ----------------------------------------------------------------------------------------------
# Hugging Face Mamba / Mamba2 and mamba_ssm


def _hf_model(kind: str, tie: bool = True, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "mamba":
        config = transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=D, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
            time_step_rank=4, tie_word_embeddings=tie, use_mambapy=False,
        )  # fmt: skip
        model = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(
            vocab_size=VOCAB, hidden_size=D, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
            num_heads=4, head_dim=16, n_groups=2, chunk_size=8, tie_word_embeddings=tie,
        )  # fmt: skip
        model = transformers.Mamba2ForCausalLM(config)
    with torch.no_grad():  # move every parameter off its init so that a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.0, 2.5))
            elif name.endswith(("dt_proj.bias", "dt_bias")):
                p.copy_(torch.empty_like(p).uniform_(-4.0, -1.0))
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind, tie", [("mamba", True), ("mamba2", False)])
def test_hf_checkpoint_logits_and_greedy_match_transformers(tmp_path, kind, tie):
    hf = _hf_model(kind, tie)
    hf.save_pretrained(tmp_path)
    assert detect_format(tmp_path) == f"hf_{kind}"
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    model = from_pretrained(tmp_path)
    with torch.no_grad():
        want = hf(ids).logits
        _assert_close(model(ids), want, 1e-4)
    # greedy generation, token for token with transformers' own generate
    prompt = ids[:1, :6]
    want_ids = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(prompt, 8, temperature=0.0).tolist() == want_ids.tolist()


def _mamba_ssm_from_hf(tmp_path, hf, kind: str) -> dict:
    """Write a Hugging Face Mamba model as a mamba_ssm MambaLMHeadModel directory (config.json + .bin)."""
    c = hf.config
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state.setdefault("lm_head.weight", state["backbone.embedding.weight"])
    if kind == "mamba":
        ssm_cfg = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand, "dt_rank": c.time_step_rank}
    else:
        ssm_cfg = {
            "layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
            "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size,
        }  # fmt: skip
    cfg = {
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": VOCAB - 3,
        "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": bool(c.tie_word_embeddings),
    }  # fmt: skip
    _write(tmp_path, cfg, state, bin_file=True)
    return cfg


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mamba_ssm_checkpoint_matches_transformers_and_round_trips(tmp_path, kind):
    hf = _hf_model(kind, tie=kind == "mamba")
    _mamba_ssm_from_hf(tmp_path / "src", hf, kind)  # vocab 45 padded to 48 by pad_vocab_size_multiple
    assert detect_format(tmp_path / "src") == "mamba_ssm"
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    model = from_pretrained(tmp_path / "src")
    with torch.no_grad():
        want = hf(ids).logits
        _assert_close(model(ids), want, 1e-4)
    # export back to mamba_ssm's layout and import again: same tensors, same logits
    save_pretrained(model, tmp_path / "out", format="mamba_ssm")
    original = torch.load(tmp_path / "src" / "pytorch_model.bin", weights_only=True)
    exported = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k
    again = from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    # and to Hugging Face's layout, read back by transformers itself
    transformers = pytest.importorskip("transformers")
    save_pretrained(model, tmp_path / "hf", format="hf")
    cls = transformers.MambaForCausalLM if kind == "mamba" else transformers.Mamba2ForCausalLM
    back = cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        _assert_close(back(ids).logits, want, 1e-5)


def _mha_ref(h, p, attn_cfg):
    """mamba_ssm's MHA (causal, rotary on the whole head, no conv/mlp): in_proj = [q; k; v]."""
    nh, nkv, dh = attn_cfg["num_heads"], attn_cfg["num_heads_kv"], attn_cfg["head_dim"]
    qkv = h @ p["in_proj.weight"].T + p.get("in_proj.bias", 0)
    q, kv = qkv.split([nh * dh, 2 * nkv * dh], -1)
    kv = kv.view(-1, 2, nkv, dh)
    q = _rope(q.view(-1, nh, dh), attn_cfg["rotary_emb_base"])
    k = _rope(kv[:, 0], attn_cfg["rotary_emb_base"])
    return _attention(q, k, kv[:, 1]).reshape(h.shape[0], -1) @ p["out_proj.weight"].T


def test_mamba_ssm_hybrid_with_attention_and_mlp(tmp_path):
    """mamba_ssm Mamba2 + attn_layer_idx + d_intermediate: mixer from transformers' Mamba2 module, MHA and
    GatedMLP (fc1 = [up; gate], hidden rounded up to 128) written here from mamba_ssm's source."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    hcfg = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=D, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
        num_heads=4, head_dim=16, n_groups=1, chunk_size=8, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    n_layer, attn_idx, d_int = 3, [1], 100  # d_intermediate 100 -> GatedMLP hidden 128
    attn_cfg = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 8, "rotary_emb_base": 1000.0,
                "causal": True, "qkv_proj_bias": True, "out_proj_bias": False}  # fmt: skip
    mixers = {}
    sd = {"backbone.embedding.weight": torch.randn(VOCAB, D), "backbone.norm_f.weight": 1 + 0.1 * torch.randn(D)}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    for i in range(n_layer):
        pre = f"backbone.layers.{i}."
        sd[pre + "norm.weight"] = 1 + 0.1 * torch.randn(D)
        sd[pre + "norm2.weight"] = 1 + 0.1 * torch.randn(D)
        sd[pre + "mlp.fc1.weight"] = 0.2 * torch.randn(256, D)
        sd[pre + "mlp.fc2.weight"] = 0.1 * torch.randn(D, 128)
        if i in attn_idx:
            sd[pre + "mixer.in_proj.weight"] = 0.3 * torch.randn((4 + 2 * 2) * 8, D)
            sd[pre + "mixer.in_proj.bias"] = 0.1 * torch.randn((4 + 2 * 2) * 8)
            sd[pre + "mixer.out_proj.weight"] = 0.1 * torch.randn(D, 32)
        else:
            mixer = Mamba2Mixer(hcfg, layer_idx=i).eval()
            with torch.no_grad():
                for p in mixer.parameters():
                    p.add_(0.1 * torch.randn_like(p))
                mixer.A_log.uniform_(0.0, 2.0)
            mixers[i] = mixer
            sd.update({pre + "mixer." + k: v.detach().clone() for k, v in mixer.state_dict().items()})
    cfg = {"d_model": D, "d_intermediate": d_int, "n_layer": n_layer, "vocab_size": VOCAB,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1, "chunk_size": 8},
           "attn_layer_idx": attn_idx, "attn_cfg": attn_cfg, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}  # fmt: skip
    _write(tmp_path, cfg, sd, bin_file=True)

    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = sd["backbone.embedding.weight"][ids[0]]
        for i in range(n_layer):
            pre = f"backbone.layers.{i}."
            h = _rms(x, sd[pre + "norm.weight"], 1e-5)
            if i in attn_idx:
                p = {k[len(pre + "mixer.") :]: v for k, v in sd.items() if k.startswith(pre + "mixer.")}
                x = x + _mha_ref(h, p, attn_cfg)
            else:
                x = x + mixers[i](h[None])[0]
            h = _rms(x, sd[pre + "norm2.weight"], 1e-5)
            y, gate = (h @ sd[pre + "mlp.fc1.weight"].T).chunk(2, -1)
            x = x + (y * F.silu(gate)) @ sd[pre + "mlp.fc2.weight"].T
        want = _rms(x, sd["backbone.norm_f.weight"], 1e-5) @ sd["lm_head.weight"].T

    model = from_pretrained(tmp_path)
    assert model.config.pattern == "MAM" and model.config.mlp_hidden == 128
    with torch.no_grad():
        _assert_close(model(ids)[0], want, 1e-4)
    save_pretrained(model, tmp_path / "out", format="mamba_ssm")
    exported = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    for k, v in sd.items():
        assert torch.equal(exported[k], v), k
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["attn_layer_idx"] == attn_idx and out_cfg["attn_cfg"]["num_heads_kv"] == 2
    assert math.ceil(out_cfg["d_intermediate"] / 128) * 128 == 128


def test_mamba_ssm_unsupported_and_export_refusal(tmp_path):
    from mixlab.config import ModelConfig
    from mixlab.models import build_model

    cfg = {"d_model": D, "n_layer": 2, "vocab_size": VOCAB, "ssm_cfg": {}, "rms_norm": False}
    _write(tmp_path, cfg, {"backbone.embedding.weight": torch.zeros(VOCAB, D)}, bin_file=True)
    with pytest.raises(UnsupportedCheckpointError, match="rms_norm=False"):
        from_pretrained(tmp_path)
    model = build_model(ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=1, pattern="A", d_intermediate=64))
    with pytest.raises(UnsupportedCheckpointError, match="multiple of 128"):
        save_pretrained(model, tmp_path / "x", format="mamba_ssm")
