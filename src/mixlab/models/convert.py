"""Checkpoint formats of other projects <-> mixlab's :class:`~mixlab.models.LanguageModel`.

Each importer maps a source ``config.json`` (a dict) and state dict to a
:class:`~mixlab.config.ModelConfig` and a state dict in mixlab's names, plus ``origin`` (mixlab key ->
source key, for error messages). Anything mixlab cannot represent exactly fails with
:class:`UnsupportedCheckpointError` naming the setting; weights that do not fit the model built from
the config fail in :func:`load_converted_state` with every mismatch listed, tensor by tensor.

mixlab's names: ``embed.weight``; ``layers.i.norm.weight``, ``layers.i.mixer.*`` (mamba_ssm's
parameter names for Mamba/Mamba2, fla's for DeltaNet/Gated DeltaNet, ``q_proj/k_proj/v_proj/o_proj``
for attention), ``layers.i.mlp_norm.weight``, ``layers.i.mlp.{gate,up,down}_proj.weight``;
``norm_f.weight``; ``lm_head.weight``.

Formats (source key layout -> mixlab):

- ``mamba_ssm`` (``MambaLMHeadModel``: config.json + pytorch_model.bin): ``backbone.embedding``,
  ``backbone.layers.i.{norm, mixer, norm2, mlp.fc1, mlp.fc2}``, ``backbone.norm_f``, ``lm_head``.
  ``mlp.fc1`` is ``[up; gate]`` stacked (``GatedMLP``: ``y, gate = fc1(x).chunk(2)``,
  ``fc2(y * silu(gate))``), its hidden size ``d_intermediate`` rounded up to a multiple of 128.
  Attention layers (``attn_layer_idx``) are ``MHA``: ``in_proj`` = ``[q; k; v]`` rows, ``out_proj``.
  The vocabulary is padded up to ``pad_vocab_size_multiple``.
- ``hf_mamba`` / ``hf_mamba2`` (Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM``): as
  mamba_ssm's mixer-only stacks, under ``backbone.embeddings``; ``lm_head`` absent when tied.
- ``fla_gated_deltanet`` / ``fla_deltanet`` (fla ``GatedDeltaNetForCausalLM`` /
  ``DeltaNetForCausalLM``): ``model.embeddings``, ``model.layers.i.{attn_norm, attn, mlp_norm,
  mlp}``, ``model.norm``, ``lm_head``; hybrid attention layers from ``config.attn``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ..config import (
    AttentionConfig,
    DeltaNetConfig,
    GatedDeltaNetConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
)

__all__ = [
    "FORMATS",
    "CheckpointMismatchError",
    "UnsupportedCheckpointError",
    "from_fla",
    "from_hf_mamba",
    "from_mamba_ssm",
    "load_converted_state",
    "to_hf_mamba",
    "to_mamba_ssm",
]

FORMATS = ("mixlab", "mamba_ssm", "hf_mamba", "hf_mamba2", "fla_gated_deltanet", "fla_deltanet")

State = dict[str, torch.Tensor]


class UnsupportedCheckpointError(ValueError):
    """The source checkpoint uses a setting mixlab's model cannot represent exactly."""


class CheckpointMismatchError(ValueError):
    """The converted weights do not fit the model built from the converted config."""


def _unsupported(fmt: str, what: str, fix: str = "") -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"{fmt} checkpoint: {what}; mixlab cannot load it exactly{'. ' + fix if fix else ''}"
    )


def _json_float(x: Any) -> float:
    """A float from config.json: a number, a string ("Infinity"), or transformers' ``{"__float__": "Infinity"}``."""
    if isinstance(x, dict) and "__float__" in x:
        x = x["__float__"]
    return float(x)


def _pad_vocab(vocab: int, multiple: int) -> int:
    return vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple


# ----------------------------------------------------------------------------------------------
# mamba_ssm MambaLMHeadModel

_MAMBA1_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "conv_bias", "bias"}
_MAMBA1_INIT_ONLY = {"dt_init", "dt_scale", "use_fast_path", "layer", "layer_idx"}
_MAMBA2_KEYS = {
    "d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "dt_min", "dt_max",
    "dt_init_floor", "conv_bias", "bias", "norm_before_gate", "chunk_size",
}  # fmt: skip
_MAMBA2_INIT_ONLY = {"conv_init", "use_mem_eff_path", "layer", "layer_idx", "process_group", "sequence_parallel"}


def _mamba_ssm_ssm_config(ssm_cfg: dict[str, Any], d_model: int) -> tuple[str, MambaConfig | Mamba2Config]:
    fmt = "mamba_ssm"
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer == "Mamba1":
        unknown = set(ssm_cfg) - _MAMBA1_KEYS - _MAMBA1_INIT_ONLY
        if unknown:
            raise _unsupported(fmt, f"ssm_cfg has Mamba1 settings {sorted(unknown)} that mixlab's Mamba does not have")
        return "m", MambaConfig(**{k: v for k, v in ssm_cfg.items() if k in _MAMBA1_KEYS})
    if layer != "Mamba2":
        raise _unsupported(fmt, f"ssm_cfg.layer={layer!r}", "mixlab imports Mamba1 and Mamba2 layers")
    expand = ssm_cfg.get("expand", 2)
    d_ssm = ssm_cfg.get("d_ssm")
    if d_ssm is not None and d_ssm != expand * d_model:
        raise _unsupported(fmt, f"ssm_cfg.d_ssm={d_ssm} (a gated MLP beside the SSM inside the mixer)")
    if ssm_cfg.get("D_has_hdim", False):
        raise _unsupported(fmt, "ssm_cfg.D_has_hdim=True (a D per channel instead of per head)")
    if not ssm_cfg.get("rmsnorm", True):
        raise _unsupported(fmt, "ssm_cfg.rmsnorm=False (Mamba2 without its gated RMSNorm)")
    dt_limit = ssm_cfg.get("dt_limit", (0.0, float("inf")))
    if tuple(_json_float(x) for x in dt_limit) != (0.0, float("inf")):
        raise _unsupported(fmt, f"ssm_cfg.dt_limit={dt_limit} (a clamp on dt)")
    unknown = set(ssm_cfg) - _MAMBA2_KEYS - _MAMBA2_INIT_ONLY - {"d_ssm", "D_has_hdim", "rmsnorm", "dt_limit"}
    if unknown:
        raise _unsupported(fmt, f"ssm_cfg has Mamba2 settings {sorted(unknown)} that mixlab's Mamba2 does not have")
    kw = {k: v for k, v in ssm_cfg.items() if k in _MAMBA2_KEYS}
    if "A_init_range" in kw:
        kw["A_init_range"] = tuple(kw["A_init_range"])
    return "M", Mamba2Config(**kw)


def _mamba_ssm_attn_config(attn_cfg: dict[str, Any], d_model: int) -> AttentionConfig:
    fmt = "mamba_ssm"
    n_heads = attn_cfg.get("num_heads")
    if not n_heads:
        raise _unsupported(fmt, "attn_cfg has no num_heads", "set attn_cfg.num_heads in config.json")
    head_dim = attn_cfg.get("head_dim") or d_model // n_heads
    if not attn_cfg.get("causal", False):
        raise _unsupported(fmt, "attn_cfg.causal is not true (bidirectional attention in a language model)")
    if attn_cfg.get("rotary_emb_dim", 0) != head_dim:
        raise _unsupported(
            fmt,
            f"attn_cfg.rotary_emb_dim={attn_cfg.get('rotary_emb_dim', 0)} (mixlab applies RoPE to the whole head_dim={head_dim})",
        )
    if attn_cfg.get("rotary_emb_interleaved", False):
        raise _unsupported(fmt, "attn_cfg.rotary_emb_interleaved=True (mixlab's RoPE rotates halves)")
    for key in ("mlp_dim", "d_conv"):
        if attn_cfg.get(key, 0):
            raise _unsupported(fmt, f"attn_cfg.{key}={attn_cfg[key]} (mixlab's attention has no {key})")
    if attn_cfg.get("out_proj_bias", True):
        raise _unsupported(fmt, "attn_cfg.out_proj_bias is true (mixlab's attention output projection has no bias)")
    scale = attn_cfg.get("softmax_scale")
    if scale is not None and not math.isclose(scale, head_dim**-0.5):
        raise _unsupported(fmt, f"attn_cfg.softmax_scale={scale} (mixlab uses head_dim ** -0.5)")
    return AttentionConfig(
        n_heads=n_heads,
        n_kv_heads=attn_cfg.get("num_heads_kv") or n_heads,
        head_dim=head_dim,
        rope_theta=float(attn_cfg.get("rotary_emb_base", 10000.0)),
        qkv_bias=bool(attn_cfg.get("qkv_proj_bias", True)),
    )


def from_mamba_ssm(cfg: dict[str, Any], state: State) -> tuple[ModelConfig, State, dict[str, str]]:
    """mamba_ssm ``MambaLMHeadModel`` config + state dict -> mixlab (see the module doc)."""
    fmt = "mamba_ssm"
    if not cfg.get("rms_norm", True):
        raise _unsupported(fmt, "rms_norm=False (LayerNorm blocks)", "mixlab's blocks use RMSNorm")
    d_model, n_layer = int(cfg["d_model"]), int(cfg["n_layer"])
    letter, ssm = _mamba_ssm_ssm_config(dict(cfg.get("ssm_cfg") or {}), d_model)
    attn_idx = sorted(int(i) for i in (cfg.get("attn_layer_idx") or []))
    bad = [i for i in attn_idx if not 0 <= i < n_layer]
    if bad:
        raise _unsupported(fmt, f"attn_layer_idx {bad} outside 0..{n_layer - 1}")
    attention = _mamba_ssm_attn_config(dict(cfg.get("attn_cfg") or {}), d_model) if attn_idx else AttentionConfig()
    d_int = int(cfg.get("d_intermediate", 0) or 0)
    d_int = (d_int + 127) // 128 * 128  # GatedMLP rounds its hidden size up to multiple_of=128
    types = ["A" if i in attn_idx else letter for i in range(n_layer)]
    vocab = _pad_vocab(int(cfg["vocab_size"]), int(cfg.get("pad_vocab_size_multiple", 8)))
    config = ModelConfig(
        name=str(cfg.get("name", "mamba_ssm-import")),
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layer,
        pattern="".join(types),
        d_intermediate=d_int,
        tie_embeddings=bool(cfg.get("tie_embeddings", True)),
        norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
        attention=attention,
        **({"mamba": ssm} if letter == "m" else {"mamba2": ssm}),
    )
    out, origin = _rename_backbone(state, "backbone.embedding.weight", types, attention, fmt)
    return config, out, origin


def _split_rows(t: torch.Tensor, sizes: list[int], key: str, fmt: str) -> list[torch.Tensor]:
    if t.shape[0] != sum(sizes):
        raise CheckpointMismatchError(
            f"{fmt} checkpoint: {key} has {t.shape[0]} rows, expected {sum(sizes)} (= {' + '.join(map(str, sizes))})"
        )
    return list(torch.split(t, sizes, dim=0))


def _rename_backbone(
    state: State, embed_key: str, types: list[str], attention: AttentionConfig, fmt: str
) -> tuple[State, dict[str, str]]:
    """mamba_ssm / Hugging Face Mamba key layout -> mixlab."""
    out: State = {}
    origin: dict[str, str] = {}

    def put(name: str, value: torch.Tensor, src: str) -> None:
        out[name] = value
        origin[name] = src

    layer_re = re.compile(r"backbone\.layers\.(\d+)\.(.+)")
    for key, t in state.items():
        if key == embed_key:
            put("embed.weight", t, key)
        elif key == "backbone.norm_f.weight":
            put("norm_f.weight", t, key)
        elif key == "lm_head.weight":
            put("lm_head.weight", t, key)
        elif m := layer_re.fullmatch(key):
            i, rest = int(m.group(1)), m.group(2)
            pre = f"layers.{i}."
            is_attn = i < len(types) and types[i] in "AS"
            if rest == "norm.weight":
                put(pre + "norm.weight", t, key)
            elif rest == "norm2.weight":
                put(pre + "mlp_norm.weight", t, key)
            elif rest == "mlp.fc1.weight":
                up, gate = _split_rows(t, [t.shape[0] // 2] * 2, key, fmt)
                put(pre + "mlp.up_proj.weight", up, key)
                put(pre + "mlp.gate_proj.weight", gate, key)
            elif rest == "mlp.fc2.weight":
                put(pre + "mlp.down_proj.weight", t, key)
            elif is_attn and rest in ("mixer.in_proj.weight", "mixer.in_proj.bias"):
                hd = attention.head_dim
                nkv = attention.n_kv_heads or attention.n_heads
                sizes = [attention.n_heads * hd, nkv * hd, nkv * hd]
                kind = rest.rsplit(".", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), _split_rows(t, sizes, key, fmt)):
                    put(f"{pre}mixer.{proj}.{kind}", part, key)
            elif is_attn and rest.startswith("mixer.out_proj."):
                put(pre + "mixer.o_proj." + rest.rsplit(".", 1)[1], t, key)
            else:
                put(pre + rest, t, key)
        else:
            put(key, t, key)  # reported as unexpected
    return out, origin


def to_mamba_ssm(model: nn.Module) -> tuple[dict[str, Any], State]:
    """A mixlab model as mamba_ssm's ``MambaLMHeadModel`` ``(config.json dict, state dict)``.

    Representable: Mamba or Mamba2 layers (one kind per model), full-attention layers
    (``attn_layer_idx``), with or without SwiGLU MLPs (hidden size a multiple of 128), RMSNorm eps 1e-5.
    """
    fmt = "mamba_ssm"
    cfg: ModelConfig = model.config
    types = cfg.layer_types
    other = sorted(set(types) - {"m", "M", "A"})
    if other:
        raise UnsupportedCheckpointError(
            f"cannot export to {fmt}: layers {other} (pattern {cfg.pattern!r}); MambaLMHeadModel holds Mamba or "
            "Mamba2 layers and full-attention layers only"
        )
    ssm = sorted(set(types) & {"m", "M"})
    if len(ssm) > 1:
        raise UnsupportedCheckpointError(f"cannot export to {fmt}: it allows one SSM kind per model, pattern has {ssm}")
    if not math.isclose(cfg.norm_eps, 1e-5):
        raise UnsupportedCheckpointError(f"cannot export to {fmt}: norm_eps={cfg.norm_eps} (mamba_ssm fixes 1e-5)")
    if cfg.mlp_hidden % 128:
        raise UnsupportedCheckpointError(
            f"cannot export to {fmt}: MLP hidden size {cfg.mlp_hidden} is not a multiple of 128 (GatedMLP rounds it up)"
        )
    if ssm == ["m"]:
        c = cfg.mamba
        ssm_cfg: dict[str, Any] = {"layer": "Mamba1", **{k: getattr(c, k) for k in sorted(_MAMBA1_KEYS)}}
    else:
        c2 = cfg.mamba2
        ssm_cfg = {"layer": "Mamba2", **{k: getattr(c2, k) for k in sorted(_MAMBA2_KEYS)}, "rmsnorm": True}
        ssm_cfg["A_init_range"] = list(c2.A_init_range)
    attn_idx = [i for i, t in enumerate(types) if t == "A"]
    a = cfg.attention
    head_dim = a.head_dim or cfg.d_model // a.n_heads
    attn_cfg = (
        {
            "num_heads": a.n_heads,
            "num_heads_kv": a.n_kv_heads or a.n_heads,
            "head_dim": head_dim,
            "rotary_emb_dim": head_dim,
            "rotary_emb_base": a.rope_theta,
            "causal": True,
            "qkv_proj_bias": a.qkv_bias,
            "out_proj_bias": False,
        }
        if attn_idx
        else {}
    )
    config = {
        "d_model": cfg.d_model,
        "d_intermediate": cfg.mlp_hidden,
        "n_layer": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": attn_idx,
        "attn_cfg": attn_cfg,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8 if cfg.vocab_size % 8 == 0 else 1,
        "tie_embeddings": cfg.tie_embeddings,
    }
    src = {k: v.detach() for k, v in model.state_dict().items()}
    out: State = {}
    layer_re = re.compile(r"layers\.(\d+)\.(.+)")
    for key, t in src.items():
        if key == "embed.weight":
            out["backbone.embedding.weight"] = t
        elif key == "norm_f.weight":
            out["backbone.norm_f.weight"] = t
        elif key == "lm_head.weight":
            out["lm_head.weight"] = t  # mamba_ssm's state dict holds it even when tied
        elif m := layer_re.fullmatch(key):
            i, rest = int(m.group(1)), m.group(2)
            pre = f"backbone.layers.{i}."
            if rest == "mlp_norm.weight":
                out[pre + "norm2.weight"] = t
            elif rest == "mlp.gate_proj.weight":
                out[pre + "mlp.fc1.weight"] = torch.cat([src[f"layers.{i}.mlp.up_proj.weight"], t], dim=0)
            elif rest == "mlp.up_proj.weight":
                continue
            elif rest == "mlp.down_proj.weight":
                out[pre + "mlp.fc2.weight"] = t
            elif types[i] == "A" and rest.startswith("mixer.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [src[f"layers.{i}.mixer.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{pre}mixer.in_proj.{kind}"] = torch.cat(parts, dim=0)
            elif types[i] == "A" and rest.startswith(("mixer.k_proj.", "mixer.v_proj.")):
                continue
            elif types[i] == "A" and rest.startswith("mixer.o_proj."):
                out[pre + "mixer.out_proj." + rest.rsplit(".", 1)[1]] = t
            else:
                out[pre + rest] = _as_conv1d(rest, t)
        else:
            raise UnsupportedCheckpointError(f"cannot export to {fmt}: no place for mixlab tensor {key!r}")
    return config, out


def _as_conv1d(name: str, t: torch.Tensor) -> torch.Tensor:
    """Depthwise conv weights in nn.Conv1d's ``[C, 1, W]`` layout (what mamba_ssm and fla store)."""
    if name.endswith("conv1d.weight") and t.dim() == 2:
        return t[:, None, :]
    return t


# ----------------------------------------------------------------------------------------------
# Hugging Face MambaForCausalLM / Mamba2ForCausalLM


def from_hf_mamba(cfg: dict[str, Any], state: State) -> tuple[ModelConfig, State, dict[str, str]]:
    """Hugging Face ``MambaForCausalLM`` (``model_type: mamba``) or ``Mamba2ForCausalLM`` (``mamba2``)."""
    kind = cfg.get("model_type")
    fmt = f"hf_{kind}"
    if cfg.get("hidden_act", "silu") != "silu":
        raise _unsupported(fmt, f"hidden_act={cfg['hidden_act']!r} (mixlab's Mamba uses SiLU)")
    d_model = int(cfg["hidden_size"])
    common = dict(
        d_state=int(cfg.get("state_size", 16 if kind == "mamba" else 128)),
        d_conv=int(cfg.get("conv_kernel", 4)),
        expand=int(cfg.get("expand", 2)),
        conv_bias=bool(cfg.get("use_conv_bias", True)),
        bias=bool(cfg.get("use_bias", False)),
        dt_min=float(cfg.get("time_step_min", 0.001)),
        dt_max=float(cfg.get("time_step_max", 0.1)),
        dt_init_floor=float(cfg.get("time_step_floor", 1e-4)),
    )
    if kind == "mamba":
        if cfg.get("intermediate_size", common["expand"] * d_model) != common["expand"] * d_model:
            raise _unsupported(fmt, f"intermediate_size={cfg['intermediate_size']} != expand * hidden_size")
        rank = cfg.get("time_step_rank", "auto")
        ssm: MambaConfig | Mamba2Config = MambaConfig(dt_rank=rank if rank == "auto" else int(rank), **common)
        letter = "m"
    elif kind == "mamba2":
        limit = tuple(_json_float(x) for x in cfg.get("time_step_limit", (0.0, float("inf"))))
        if limit != (0.0, float("inf")):
            raise _unsupported(fmt, f"time_step_limit={list(limit)} (a clamp on dt)")
        n_heads, head_dim = int(cfg.get("num_heads", 128)), int(cfg.get("head_dim", 64))
        if n_heads * head_dim != common["expand"] * d_model:
            raise _unsupported(fmt, f"num_heads * head_dim = {n_heads * head_dim} != expand * hidden_size")
        ssm = Mamba2Config(
            headdim=head_dim,
            ngroups=int(cfg.get("n_groups", 8)),
            chunk_size=int(cfg.get("chunk_size", 256)),
            norm_before_gate=False,
            **common,
        )
        letter = "M"
    else:
        raise _unsupported("hf", f"model_type={kind!r}", "mixlab imports model_type 'mamba' and 'mamba2'")
    n_layers = int(cfg["num_hidden_layers"])
    config = ModelConfig(
        name=f"{kind}-hf-import",
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        pattern=letter,
        d_intermediate=0,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", kind == "mamba")),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        **({"mamba": ssm} if letter == "m" else {"mamba2": ssm}),
    )
    out, origin = _rename_backbone(state, "backbone.embeddings.weight", [letter] * n_layers, AttentionConfig(), fmt)
    return config, out, origin


def to_hf_mamba(model: nn.Module) -> tuple[dict[str, Any], State]:
    """A mixer-only Mamba or Mamba2 mixlab model as Hugging Face ``MambaForCausalLM`` /
    ``Mamba2ForCausalLM`` ``(config.json dict, state dict)``."""
    cfg: ModelConfig = model.config
    if set(cfg.layer_types) not in ({"m"}, {"M"}) or cfg.mlp_hidden:
        raise UnsupportedCheckpointError(
            f"cannot export to Hugging Face Mamba: pattern {cfg.pattern!r} with MLP hidden {cfg.mlp_hidden}; "
            "only pure Mamba or pure Mamba2 stacks without MLPs (d_intermediate=0) are representable"
        )
    mamba_cfg, state = to_mamba_ssm(model)
    state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    common = {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "residual_in_fp32": True,
        "hidden_act": "silu",
    }
    if cfg.pattern[0] == "m":
        c = cfg.mamba
        rank = math.ceil(cfg.d_model / 16) if c.dt_rank == "auto" else c.dt_rank
        extra = {
            "model_type": "mamba",
            "architectures": ["MambaForCausalLM"],
            "state_size": c.d_state,
            "conv_kernel": c.d_conv,
            "expand": c.expand,
            "intermediate_size": c.expand * cfg.d_model,
            "time_step_rank": rank,
            "use_bias": c.bias,
            "use_conv_bias": c.conv_bias,
        }
    else:
        c2 = cfg.mamba2
        if c2.norm_before_gate:
            raise UnsupportedCheckpointError("cannot export to Hugging Face Mamba2: norm_before_gate=True")
        extra = {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            "num_heads": c2.expand * cfg.d_model // c2.headdim,
            "head_dim": c2.headdim,
            "state_size": c2.d_state,
            "n_groups": c2.ngroups,
            "conv_kernel": c2.d_conv,
            "expand": c2.expand,
            "chunk_size": c2.chunk_size,
            "use_bias": c2.bias,
            "use_conv_bias": c2.conv_bias,
        }
    del mamba_cfg
    return {**extra, **common}, state


# ----------------------------------------------------------------------------------------------
# fla GatedDeltaNetForCausalLM / DeltaNetForCausalLM


def _fla_mlp_hidden(cfg: dict[str, Any], d_model: int) -> int:
    if cfg.get("intermediate_size") is not None:
        return int(cfg["intermediate_size"])
    ratio = cfg.get("hidden_ratio") or 4
    hidden = int(d_model * ratio * 2 / 3)
    return 256 * ((hidden + 255) // 256)


def from_fla(cfg: dict[str, Any], state: State) -> tuple[ModelConfig, State, dict[str, str]]:
    """fla ``GatedDeltaNetForCausalLM`` (``model_type: gated_deltanet``) or ``DeltaNetForCausalLM``
    (``delta_net``), hybrids with ``attn`` layers included."""
    kind = cfg.get("model_type")
    fmt = f"fla {kind}"
    d_model, n_layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    if cfg.get("hidden_act", "swish") not in ("swish", "silu"):
        raise _unsupported(fmt, f"hidden_act={cfg['hidden_act']!r} (mixlab's MLP is SwiGLU)")
    if cfg.get("allow_neg_eigval", False):
        raise _unsupported(fmt, "allow_neg_eigval=True (beta in (0, 2))")
    use_conv = bool(cfg.get("use_short_conv", True))
    if kind == "gated_deltanet":
        if not cfg.get("use_gate", True):
            raise _unsupported(fmt, "use_gate=False (mixlab's Gated DeltaNet always has its output gate)")
        n_heads = int(cfg.get("num_heads", 6))
        if cfg.get("num_v_heads") not in (None, n_heads):
            raise _unsupported(fmt, f"num_v_heads={cfg['num_v_heads']} != num_heads={n_heads} (grouped value heads)")
        mixer: dict[str, Any] = {
            "gated_deltanet": GatedDeltaNetConfig(
                n_heads=n_heads,
                head_dim=int(cfg.get("head_dim", 256)),
                expand_v=float(cfg.get("expand_v", 2.0)),
                conv_size=int(cfg.get("conv_size", 4)),
                use_short_conv=use_conv,
            )
        }
        letter = "G"
    elif kind == "delta_net":
        for key, want in (("use_beta", True), ("qk_norm", "l2"), ("qk_activation", "silu")):
            if cfg.get(key, want) != want:
                raise _unsupported(fmt, f"{key}={cfg[key]!r} (mixlab's DeltaNet has {key}={want!r})")
        n_heads = int(cfg.get("num_heads", 16))
        key_dim = int(d_model * float(cfg.get("expand_k", 1.0)))
        value_dim = int(d_model * float(cfg.get("expand_v", 1.0)))
        if key_dim % n_heads or value_dim % n_heads:
            raise _unsupported(fmt, f"key dim {key_dim} / value dim {value_dim} not divisible by num_heads={n_heads}")
        head_dim = key_dim // n_heads
        mixer = {
            "deltanet": DeltaNetConfig(
                n_heads=n_heads,
                head_dim=head_dim,
                expand_v=(value_dim // n_heads) / head_dim,
                conv_size=int(cfg.get("conv_size", 4)),
                use_short_conv=use_conv,
                use_output_gate=bool(cfg.get("use_gate", False)),
            )
        }
        letter = "D"
    else:
        raise _unsupported("fla", f"model_type={kind!r}", "mixlab imports 'gated_deltanet' and 'delta_net'")

    types = [letter] * n_layers
    attention = AttentionConfig()
    attn = cfg.get("attn")
    if attn:
        layers = sorted(int(i) for i in attn.get("layers", []))
        n_h = int(attn["num_heads"])
        if d_model % n_h:
            raise _unsupported(fmt, f"attn.num_heads={n_h} does not divide hidden_size={d_model}")
        if attn.get("qk_norm", False):
            raise _unsupported(fmt, "attn.qk_norm=True (mixlab's attention has no q/k norm)")
        window = attn.get("window_size")
        attention = AttentionConfig(
            n_heads=n_h,
            n_kv_heads=int(attn.get("num_kv_heads") or n_h),
            head_dim=d_model // n_h,
            rope_theta=float(attn.get("rope_theta", 10000.0) or 10000.0),
            qkv_bias=bool(attn.get("qkv_bias", False)),
            **({"window": int(window)} if window else {}),
        )
        for i in layers:
            if not 0 <= i < n_layers:
                raise _unsupported(fmt, f"attn.layers has {i}, outside 0..{n_layers - 1}")
            types[i] = "S" if window else "A"
    config = ModelConfig(
        name=f"{kind}-fla-import",
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        pattern="".join(types),
        d_intermediate=_fla_mlp_hidden(cfg, d_model),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=float(cfg.get("norm_eps", 1e-6)),
        attention=attention,
        **mixer,
    )
    out: State = {}
    origin: dict[str, str] = {}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(attn_norm|attn|mlp_norm|mlp)\.(.+)")
    names = {"model.embeddings.weight": "embed.weight", "model.norm.weight": "norm_f.weight"}
    for key, t in state.items():
        if key in names:
            name = names[key]
        elif m := layer_re.fullmatch(key):
            part = {"attn_norm": "norm", "attn": "mixer"}.get(m.group(2), m.group(2))
            name = f"layers.{m.group(1)}.{part}.{m.group(3)}"
        else:
            name = key  # lm_head.weight, or reported as unexpected
        out[name] = t
        origin[name] = key
    return config, out, origin


# ----------------------------------------------------------------------------------------------
# loading with a tensor-by-tensor report


def _alias_of(model: nn.Module) -> dict[str, str]:
    """State-dict name -> the first name sharing its storage (tied weights)."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = first.setdefault(key, name)
    return out


def load_converted_state(
    model: nn.Module, state: State, origin: dict[str, str] | None = None, source: str = "checkpoint"
) -> None:
    """Copy ``state`` (mixlab names) into ``model``, or raise :class:`CheckpointMismatchError` listing
    every missing, unexpected and wrongly shaped tensor (with the source key each came from).

    Depthwise conv weights are reshaped between ``[C, 1, W]`` and ``[C, W]`` when the model stores
    the other layout. Tied weights (``lm_head`` = ``embed``) may be given once or twice (equal).
    """
    origin = origin or {}
    expected = model.state_dict()
    alias = _alias_of(model)
    fitted: State = {}
    missing, wrong, unequal = [], [], []

    def src(name: str) -> str:
        o = origin.get(name, name)
        return name if o == name else f"{name} (from {o})"

    for name, ref in expected.items():
        if name not in state:
            if alias[name] != name and alias[name] in state:
                continue
            if any(alias[other] == alias[name] and other in state for other in expected):
                continue
            missing.append(f"  {name} {list(ref.shape)}")
            continue
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            if t.numel() == ref.numel() and name.endswith("conv1d.weight"):
                t = t.reshape(ref.shape)
            else:
                wrong.append(f"  {src(name)}: checkpoint {list(t.shape)}, model {list(ref.shape)}")
                continue
        fitted[name] = t
    for name, t in fitted.items():
        first = alias[name]
        if first != name and first in fitted and not torch.equal(fitted[first].to(t.dtype), t):
            unequal.append(f"  {src(name)} differs from {src(first)}, but the config ties them")
    unexpected = [f"  {src(k)} {list(v.shape)}" for k, v in state.items() if k not in expected]
    if missing or wrong or unexpected or unequal:
        parts = [f"{source} does not fit the model built from its config:"]
        for title, items in (
            ("missing (the model has them, the checkpoint does not)", missing),
            ("unexpected (the checkpoint has them, the model does not)", unexpected),
            ("wrong shape", wrong),
            ("tied weights that differ", unequal),
        ):
            if items:
                parts.append(f"{title}: {len(items)}")
                parts.extend(items[:40] + ([f"  ... and {len(items) - 40} more"] if len(items) > 40 else []))
        parts.append(
            "Fix: check that config.json belongs to these weights; a setting mixlab does not model would "
            "have been named in an UnsupportedCheckpointError."
        )
        raise CheckpointMismatchError("\n".join(parts))
    with torch.no_grad():
        for name, t in fitted.items():
            expected[name].copy_(t)
