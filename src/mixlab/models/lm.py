"""The language model: embedding -> blocks tiled from the layer pattern -> final RMSNorm -> LM head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import Block, build_mixer
from ..layers.norm import RMSNorm


@dataclass
class ModelCache:
    """Decode state of a :class:`LanguageModel`: one cache per layer and the number of tokens consumed.

    A forward with the cache continues the sequence from ``position`` and updates everything in place.
    """

    layers: list[Any]
    batch_size: int
    max_len: int
    position: int = 0


class LanguageModel(nn.Module):
    """A causal language model over token ids.

    ``embed`` (``[V, d_model]``) -> ``layers`` (one :class:`~mixlab.layers.Block` per pattern letter,
    ``pattern`` tiled over ``n_layers``) -> ``norm_f`` -> ``lm_head`` (tied to ``embed`` when
    ``tie_embeddings``). Built on the meta device it allocates nothing: see :func:`build_model`.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d, **kw)
        self.layers = nn.ModuleList(
            Block(d, build_mixer(letter, config, i, **kw), config.mlp_hidden, config.norm_eps, **kw)
            for i, letter in enumerate(config.layer_types)
        )
        self.norm_f = RMSNorm(d, eps=config.norm_eps, **kw)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False, **kw)
        self.tie_weights()
        self.init_weights()

    # ------------------------------------------------------------------------------------------
    # construction

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``embed.weight`` when the config ties them (call again after ``to_empty``)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (also after ``to_empty()`` from the meta device).

        1. Linear and Embedding weights ~ N(0, init_std), Linear biases = 0 (parameters marked
           ``_no_reinit`` are left alone);
        2. every other submodule's ``reset_parameters()``, innermost first, so that a mixer's own
           init (A_log, dt biases, D, convs, norms, Mamba's dt_proj) runs last and wins;
        3. the Linear layers that write into the residual stream (each mixer's and MLP's
           ``residual_out_proj``) scaled by 1/sqrt(number of residual branches): 2·n_layers with
           MLPs (GPT-2), n_layers for mixer-only blocks (mamba_ssm's ``n_residuals_per_layer``).
        """
        if self.embed.weight.is_meta:
            return  # nothing to initialise yet: build_model calls this again after to_empty()
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if not getattr(module.weight, "_no_reinit", False):
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and not getattr(module.weight, "_no_reinit", False):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # Reversed pre-order visits every module after all of its descendants.
        for module in reversed(list(self.modules())):
            if module is self or isinstance(module, (nn.Linear, nn.Embedding)):
                continue  # their reset_parameters() is PyTorch's default init, replaced above
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        n_branches = sum(1 + (block.mlp is not None) for block in self.layers)
        factor = 1.0 / math.sqrt(n_branches)
        for block in self.layers:
            for owner in (block.mixer, block.mlp):
                if owner is None:
                    continue
                for name in getattr(owner, "residual_out_proj", ()):
                    proj = owner.get_submodule(name)
                    if not isinstance(proj, nn.Linear):
                        raise TypeError(f"{type(owner).__name__}.residual_out_proj names {name!r}, not an nn.Linear")
                    proj.weight.mul_(factor)

    # ------------------------------------------------------------------------------------------
    # inference

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ModelCache:
        """Decode caches of every layer for ``batch_size`` sequences of up to ``max_len`` tokens.

        ``device``/``dtype`` default to the parameters'; recurrent states stay float32 whatever ``dtype``.
        """
        p = self.embed.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        layers = [block.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype) for block in self.layers]
        return ModelCache(layers=layers, batch_size=batch_size, max_len=max_len)

    def forward_hidden(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, d_model]`` (parameter dtype) for ``input_ids [B, T]``.

        For losses that apply ``lm_head`` themselves (chunked cross-entropy). With ``cache``, the
        tokens continue the cached sequence and the cache is updated in place.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"LanguageModel: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point:
            raise TypeError(f"LanguageModel: input_ids must be integer token ids, got {input_ids.dtype}")
        if cache is not None and input_ids.shape[0] != cache.batch_size:
            raise ValueError(
                f"LanguageModel: cache was made for batch {cache.batch_size}, input_ids has batch {input_ids.shape[0]}"
            )
        x = self.embed(input_ids)
        x = x.to(Block.residual_dtype(x.dtype))
        # Each block leaves its last residual add to the next norm (one pass for both, see Block.forward),
        # except before a checkpointed block, which would have to save the pending branch as well.
        branch = None
        blocks = list(self.layers)
        for i, block in enumerate(blocks):
            defer = i + 1 == len(blocks) or not getattr(blocks[i + 1], "activation_checkpointing", False)
            out = block(x, None if cache is None else cache.layers[i], branch=branch, defer_add=defer)
            x, branch = out if defer else (out, None)
        if cache is not None:
            cache.position += input_ids.shape[1]
        if branch is None:
            return self.norm_f(x).to(self.norm_f.weight.dtype)
        return self.norm_f.add_forward(x, branch, out_dtype=self.norm_f.weight.dtype)[0]

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` for ``input_ids [B, T]`` (continuing ``cache`` when given)."""
        return self.lm_head(self.forward_hidden(input_ids, cache))

    def generate(self, input_ids: torch.Tensor | list[list[int]], max_new_tokens: int, **kwargs: Any):
        """Sample continuations through the decode cache: see :func:`mixlab.generate.generate`."""
        from ..generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------
    # introspection

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied weights counted once.

        ``exclude_embeddings``: leave out the token embedding and an untied LM head (the
        vocabulary-sized matrices), the "non-embedding" count of scaling-law papers.
        """
        skip = {id(self.embed.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        seen: set[int] = set()
        total = 0
        for p in self.parameters():  # parameters() already yields a shared tensor once
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def build_model(
    config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LanguageModel:
    """Build ``config`` on the meta device, materialise it on ``device`` (default CPU) in ``dtype``, initialise.

    Nothing is allocated before the final placement, so a model larger than host memory can still
    be built straight on the GPU (and parallelism wrappers can be applied before materialising).
    """
    with torch.device("meta"):
        model = LanguageModel(config, dtype=dtype)
    model.to_empty(device=torch.device("cpu") if device is None else device)
    model.tie_weights()
    model.init_weights()
    return model
