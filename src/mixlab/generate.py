"""Autoregressive sampling over the mixers' decode caches.

``generate(model, input_ids, max_new_tokens, ...)`` prefills the prompts once through the model's
decode cache, then feeds one token per step: per-token cost and memory are constant in the context
length for Mamba, Mamba2, DeltaNet and Gated DeltaNet (their caches are fixed-size states), a KV
cache for attention, a ring buffer for sliding windows.

Prompts of different lengths (a list of id lists, or a padded tensor plus ``attention_mask``) give
exactly the tokens each would get alone. Two ways, picked automatically:

- *row-aligned*: each group of equal-length prompts is prefilled into its own cache and copied into
  its rows of the batch cache; decoding then continues every row from its own position. Valid when
  the caches hold no shared position (pure recurrent models: states only), or hold one position per
  row (a ``[B]`` tensor).
- *lockstep*: all rows advance one position per step; the common prefix (the shortest prompt) is
  prefilled at once, then rows still inside their prompt are fed their next prompt token (teacher
  forcing) while the others sample. Works with any cache (e.g. an attention KV cache with one
  integer position for the whole batch); costs one step per token of the prompts' length spread.

Sampling, per step, on float32 logits ``[B, V]``: repetition penalty (over the prompt and the tokens
generated so far, as Hugging Face / mamba_ssm: a positive logit is divided by the penalty, a
negative one multiplied) → temperature → top-k → top-p → min-p → a draw (``temperature=0`` or
``top_k=1``: greedy argmax, deterministic). A row stops after its first EOS (kept in the output).

On CUDA, ``cuda_graph=True`` captures the one-token decode step in a CUDA graph (as mamba_ssm's
``cg=True``): it needs caches updated in place with no Python-side position; otherwise the step
runs eagerly with a warning.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TextIO

import torch
from torch import nn

__all__ = [
    "DecodeStep",
    "Streamer",
    "TextStreamer",
    "apply_repetition_penalty",
    "filter_logits",
    "generate",
    "sample_next",
    "use_row_positions",
]


class Streamer(Protocol):
    """Receives tokens as they are produced (Hugging Face's streamer protocol, without the prompt).

    ``put(tokens)`` is called once per decoding step with a CPU LongTensor ``[B]``: the new token of
    every row; rows that produced none at that step (finished, or still reading their prompt in
    lockstep mode) carry ``pad_token_id``. ``end()`` is called once at the end.
    """

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already in the sequence: ``logits [B, V]``, ``seen [B, V]`` bool.

    A seen token's logit ``l`` becomes ``l / penalty`` if ``l > 0`` else ``l * penalty`` (the CTRL
    paper's rule, as Hugging Face and mamba_ssm apply it). ``penalty > 1`` discourages repeats.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set the logits of filtered-out tokens to ``-inf`` (``[B, V]``, applied in this order):

    - ``top_k > 0``: keep the ``top_k`` largest logits (ties with the k-th are kept);
    - ``top_p < 1``: keep the smallest set of most probable tokens whose probabilities sum to at
      least ``top_p`` (the token that crosses the threshold is kept; always at least one);
    - ``min_p > 0``: keep tokens whose probability is at least ``min_p`` times the largest one.

    Each filter sees the distribution left by the previous ones (renormalised).
    """
    v = logits.shape[-1]
    if top_k > 0 and top_k < v:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from ``logits [B, V]`` -> LongTensor ``[B]`` (greedy when ``temperature == 0``
    or ``top_k == 1``)."""
    logits = logits.float()
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p, min_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be a non-negative int")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"generate: top_k={top_k} must be >= 0 (0 = no top-k filter)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1] (1 = no nucleus filter)")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"generate: min_p={min_p} must be in [0, 1) (0 = no min-p filter)")
    if repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty={repetition_penalty} must be > 0 (1 = none)")


# ----------------------------------------------------------------------------------------------
# the cache as a tree of leaves (mixers' caches are dataclasses / tuples / dicts of tensors)


def _is_counter(owner: Any, value: Any) -> bool:
    """Whether a scalar field of a layer cache only counts tokens (the layer never reads it).

    A cache class may say which of its fields are counters with a ``decode_counters`` class
    attribute. Otherwise: the integer fields of recurrent caches are counters (their math is state
    only), while an attention cache's ``pos`` is the position its next keys are written at.
    """
    if hasattr(type(owner), "decode_counters"):
        return False  # decided per field by the caller
    from .layers.attention import AttentionCache

    return isinstance(value, int) and not isinstance(value, bool) and not isinstance(owner, AttentionCache)


def _children(obj: Any) -> Iterator[tuple[Any, Any]]:
    """The fields of a cache node, leaving out token counters (see :func:`_is_counter`)."""
    if isinstance(obj, (list, tuple)):
        yield from enumerate(obj)
        return
    if isinstance(obj, dict):
        yield from obj.items()
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, nn.Module)):
        items = list(vars(obj).items())
    else:
        return
    declared = getattr(type(obj), "decode_counters", None)
    for key, value in items:
        if (declared is not None and key in declared) or _is_counter(obj, value):
            continue
        yield key, value


def _leaves(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(path, leaf)`` for every tensor or scalar in a cache tree (token counters left out)."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        yield path, obj
        return
    container = isinstance(obj, (list, tuple, dict)) or dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__")
    if not container or isinstance(obj, nn.Module):
        yield path, obj  # opaque: compared with ==
        return
    for key, value in _children(obj):
        yield from _leaves(value, (*path, key))


def _set_leaf(root: Any, path: tuple, value: Any) -> None:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(parent, (list, tuple, dict)) else getattr(parent, key)
    key = path[-1]
    if isinstance(parent, (list, dict)):
        parent[key] = value
    elif isinstance(parent, tuple):
        raise TypeError(f"cache leaf {path} sits in a tuple and cannot be replaced")
    else:
        setattr(parent, key, value)


def _layer_caches(cache: Any) -> Any:
    """The part of a model cache that the layers read: ``ModelCache.layers`` (its ``position`` is a
    counter of the model, not read by any layer), or the cache itself."""
    return getattr(cache, "layers", cache)


def use_row_positions(cache: Any, batch: int, device: torch.device) -> Any:
    """Give every layer cache that supports it (``supports_row_positions``, e.g. the attention KV cache)
    one position per row, a LongTensor ``[B]``: rows can then decode from different positions and the
    step reads no Python int. Returns ``cache``."""
    layers = _layer_caches(cache)
    for layer in layers if isinstance(layers, (list, tuple)) else ():
        if getattr(type(layer), "supports_row_positions", False) and isinstance(layer.pos, int):
            layer.pos = torch.full((batch,), layer.pos, dtype=torch.long, device=device)
    return cache


def _mergeable(dst: Any, src: Any, batch: int) -> bool:
    """Whether ``src`` (a cache of n < ``batch`` rows, after a prefill) can be copied into rows of
    ``dst`` (a fresh cache of ``batch`` rows): same tree, every tensor batch-major or unchanged, every
    scalar unchanged (a scalar that the prefill moved is a position shared by the whole batch)."""
    a, b = list(_leaves(_layer_caches(dst))), list(_leaves(_layer_caches(src)))
    if [p for p, _ in a] != [p for p, _ in b]:
        return False
    for (_, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dim() > 0 and x.shape[0] == batch and y.shape[0] != batch and x.shape[1:] == y.shape[1:]:
                continue
            if x.shape != y.shape or not torch.equal(x, y.to(x.device, x.dtype)):
                return False
        elif x != y:
            return False
    return True


def _merge_rows(dst: Any, src: Any, rows: torch.Tensor, batch: int) -> None:
    """Copy every batch-major tensor of ``src`` into rows ``rows`` of ``dst`` (in place)."""
    for (_, x), (_, y) in zip(_leaves(_layer_caches(dst)), _leaves(_layer_caches(src))):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch and y.shape[0] != batch:
            x.index_copy_(0, rows.to(x.device), y.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# the decode step, eager or captured in a CUDA graph


class _NoGraph(Exception):
    pass


def _split_leaves(tree: Any) -> tuple[list[tuple[tuple, Any]], list[tuple[tuple, torch.Tensor]]]:
    scalars, tensors = [], []
    for p, v in _leaves(tree):
        (tensors if isinstance(v, torch.Tensor) else scalars).append((p, v))
    return scalars, tensors


def _get_leaf(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key] if isinstance(root, (list, tuple, dict)) else getattr(root, key)
    return root


class _GraphedStep:
    """The one-token decode step ``tokens [B] -> logits [B, V]`` captured in a CUDA graph.

    Captured on the freshly initialised cache (before the prefill): the warm-up steps run on it and
    it is then reset to its initial (all-zero) state. The graph reads and writes the cache tensors in
    place, so they must stay the same objects: after a prefill :meth:`repin` copies back any that a
    layer replaced.
    """

    def __init__(self, model: nn.Module, cache: Any, batch: int, device: torch.device) -> None:
        self.tree = _layer_caches(cache)
        self.scalars, self.tensors = _split_leaves(self.tree)
        if any(bool(t.count_nonzero()) for _, t in self.tensors):
            raise _NoGraph("the fresh cache is not all zeros, so it cannot be reset after the warm-up")
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(self.tokens, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self._check("the warm-up")
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache)[:, -1]
        self._check("the capture")
        self.reset()
        if hasattr(cache, "position"):
            cache.position = 0

    def _check(self, when: str) -> None:
        scalars, tensors = _split_leaves(self.tree)
        moved = [p for (p, v), (_, w) in zip(self.scalars, scalars) if v != w]
        replaced = [p for (p, t), (_, u) in zip(self.tensors, tensors) if t is not u]
        if moved or replaced or len(tensors) != len(self.tensors):
            self.repin()
            self.reset()
            if moved:
                raise _NoGraph(f"{when} changed Python-side cache values {moved} (a position kept as an int)")
            raise _NoGraph(f"{when} replaced cache tensors {replaced} instead of updating them in place")

    def reset(self) -> None:
        """Zero the cache tensors and restore its scalars (the fresh cache's state)."""
        for _, t in self.tensors:
            t.zero_()
        for p, v in self.scalars:
            if _get_leaf(self.tree, p) != v:
                _set_leaf(self.tree, p, v)

    def repin(self) -> None:
        """Make the cache hold the captured tensors again (copying in values a layer rebound)."""
        for p, t in self.tensors:
            now = _get_leaf(self.tree, p)
            if now is not t:
                t.copy_(now)
                _set_leaf(self.tree, p, t)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits


class DecodeStep:
    """One decode step over ``cache``: ``tokens [B] -> logits [B, V]`` (the cache advances in place).

    ``cuda_graph=True`` on CUDA captures it in a CUDA graph; build it right after ``init_cache``
    (before the prefill) and call :meth:`after_prefill` once the prompt is in the cache. When the
    graph cannot be used, ``graph`` is None, ``why_eager`` says why and steps run eagerly.
    """

    def __init__(self, model: nn.Module, cache: Any, batch: int, cuda_graph: bool = False) -> None:
        self.model, self.cache = model, cache
        self.graph: _GraphedStep | None = None
        self.why_eager: str | None = None
        if cuda_graph:
            device = next(model.parameters()).device
            if device.type != "cuda":
                self.why_eager = f"the model is on {device}, CUDA graphs need a CUDA device"
            else:
                try:
                    self.graph = _GraphedStep(model, cache, batch, device)
                except _NoGraph as e:
                    self.why_eager = str(e)

    def after_prefill(self) -> None:
        if self.graph is not None:
            self.graph.repin()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.model(tokens[:, None], self.cache)[:, -1]
        logits = self.graph(tokens)
        if hasattr(self.cache, "position"):
            self.cache.position += 1
        return logits


# ----------------------------------------------------------------------------------------------
# generate


def _prompt_rows(
    input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None, device: torch.device
) -> tuple[list[torch.Tensor], bool]:
    """The prompts as a list of 1-D LongTensors on ``device``; True when the caller gave a tensor."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point:
            raise TypeError(f"generate: input_ids must hold integer token ids, got {input_ids.dtype}")
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise ValueError(f"generate: input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}")
        ids = ids.to(device=device, dtype=torch.long)
        if attention_mask is None:
            rows = list(ids)
        else:
            mask = attention_mask.to(device).bool()
            if mask.shape != ids.shape:
                raise ValueError(
                    f"generate: attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}"
                )
            rows = [r[m] for r, m in zip(ids, mask)]
        tensor_in = True
    else:
        if len(input_ids) == 0:
            raise ValueError("generate: input_ids is an empty list; give at least one prompt")
        if isinstance(input_ids[0], int):
            input_ids = [input_ids]  # type: ignore[list-item]
        rows = [torch.as_tensor(list(r), dtype=torch.long, device=device) for r in input_ids]
        tensor_in = False
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError(
                f"generate: prompt {i} is empty; every prompt needs at least one token (e.g. a BOS/EOS id)"
            )
    return rows, tensor_in


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    streamer: Streamer | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor | list[list[int]]:
    """Sample up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a :class:`~mixlab.models.LanguageModel` (anything with ``forward(ids [B, T], cache)
            -> logits [B, T, V]`` and ``init_cache(batch, max_len)``).
        input_ids: ``[B, T]`` or ``[T]`` LongTensor (with ``attention_mask [B, T]``, 1 = token, for
            padded prompts of different lengths, padding on either side), or a list of id lists
            (prompts of any lengths), or one id list.
        temperature, top_k, top_p, min_p, repetition_penalty: see the module doc; ``temperature=0``
            is greedy.
        eos_token_id: an id or ids that end a row (the EOS is kept); None: every row runs
            ``max_new_tokens``.
        streamer: gets each step's new tokens (see :class:`Streamer`).
        pad_token_id: fills finished rows in a tensor result (default: the first EOS id, else 0).
        seed / generator: the random stream of the draws (a seed makes a generator on the model's
            device); None uses torch's global generator.
        cuda_graph: capture the decode step in a CUDA graph (CUDA only).

    Returns:
        For a tensor ``input_ids``: LongTensor ``[B, T + max_new_tokens]``, the prompt (as given,
        padding included) followed by the generated tokens, ``pad_token_id`` after a row's EOS (the
        result is cut after the last step any row ran). For a list: one list per prompt, the prompt
        followed by its generated tokens up to and including its EOS.
    """
    _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
    device = next(model.parameters()).device
    rows, tensor_in = _prompt_rows(input_ids, attention_mask, device)
    lens = [int(r.numel()) for r in rows]
    eos = _eos_tensor(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    if seed is not None and generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        lo, hi = min(int(r.min()) for r in rows), max(int(r.max()) for r in rows)
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"generate: prompt token id {hi if hi >= vocab else lo} is outside the vocabulary [0, {vocab})"
            )

    new: list[list[int]] = [[] for _ in rows]
    if max_new_tokens > 0:
        was_training = model.training
        model.eval()
        try:
            new = _decode(
                model, rows, lens, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                eos, pad, streamer, generator, cuda_graph, device,
            )  # fmt: skip
        finally:
            model.train(was_training)
    if not tensor_in:
        return [r.tolist() + g for r, g in zip(rows, new)]
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids  # type: ignore[union-attr]
    tail = torch.full((ids.shape[0], max(map(len, new))), pad, dtype=torch.long)
    for i, g in enumerate(new):
        tail[i, : len(g)] = torch.tensor(g, dtype=torch.long)
    out = torch.cat([ids.to(torch.long), tail.to(ids.device)], dim=1)
    return out[0] if input_ids.dim() == 1 else out  # type: ignore[union-attr]


def _decode(
    model, rows, lens, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    eos, pad, streamer, generator, cuda_graph, device,
) -> list[list[int]]:  # fmt: skip
    batch = len(rows)
    max_len = max(lens) + max_new_tokens
    cache = use_row_positions(model.init_cache(batch, max_len, device=device), batch, device)

    step = DecodeStep(model, cache, batch, cuda_graph=cuda_graph)
    if cuda_graph and step.graph is None:
        warnings.warn(f"generate: no CUDA graph ({step.why_eager}); decoding eagerly", stacklevel=3)

    prompts = torch.zeros(batch, max(lens), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        prompts[i, : lens[i]] = r
    lens_t = torch.tensor(lens, device=device)
    logits, pos = _prefill(model, cache, rows, lens, prompts, max_len, device)
    step.after_prefill()

    vocab = logits.shape[-1]
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    if repetition_penalty != 1.0:
        for i, r in enumerate(rows):
            seen[i, r] = True
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    n_gen = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    arange = torch.arange(batch, device=device)
    while True:
        in_prompt = pos < lens_t
        scores = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        sampled = sample_next(scores, temperature, top_k, top_p, min_p, generator)
        teacher = prompts.gather(1, pos.clamp(max=prompts.shape[1] - 1)[:, None])[:, 0]
        producing = ~in_prompt & ~done
        # Finished rows keep being fed (their outputs are ignored) a valid id: the one they sampled.
        tok = torch.where(in_prompt, teacher, sampled)
        out[arange[producing], n_gen[producing]] = tok[producing]
        n_gen += producing.long()
        if repetition_penalty != 1.0:
            seen[arange[producing], tok[producing]] = True
        finished = n_gen >= max_new_tokens
        if eos is not None:
            finished |= producing & torch.isin(tok, eos)
        done |= finished & ~in_prompt
        if streamer is not None:
            streamer.put(torch.where(producing, tok, torch.full_like(tok, pad)).cpu())
        if bool(done.all()):
            break
        logits = step(tok)
        pos = pos + 1
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    counts = n_gen.tolist()
    return [out[i, : counts[i]].tolist() for i in range(batch)]


def _prefill(model, cache, rows, lens, prompts, max_len, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompts through ``cache``: ``(logits [B, V] of each row's last prefilled token,
    pos [B] the position each row's next input token goes to)``."""
    batch = len(rows)
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        groups.setdefault(n, []).append(i)
    if len(groups) == 1:
        logits = model(prompts, cache)[:, -1]
        return logits, torch.full((batch,), lens[0], dtype=torch.long, device=device)

    # Row-aligned: each length group prefilled into its own cache, then copied into its rows.
    logits = None
    for gi, (n, idx) in enumerate(sorted(groups.items())):
        rows_t = torch.tensor(idx, dtype=torch.long, device=device)
        gcache = use_row_positions(model.init_cache(len(idx), max_len, device=device), len(idx), device)
        glogits = model(prompts[rows_t, :n], gcache)[:, -1]
        if not _mergeable(cache, gcache, batch):
            if gi > 0:
                raise RuntimeError("generate: the layer caches of two prompt groups disagree in structure")
            break
        if logits is None:
            logits = torch.empty(batch, glogits.shape[-1], dtype=glogits.dtype, device=device)
        _merge_rows(cache, gcache, rows_t, batch)
        logits[rows_t] = glogits
        del gcache
    else:
        if hasattr(cache, "position"):
            cache.position = max(lens)  # rows sit at different positions; the model's counter takes the longest
        return logits, torch.tensor(lens, dtype=torch.long, device=device)

    # Lockstep: the caches keep one position for the whole batch. Prefill the common prefix.
    p = min(lens)
    logits = model(prompts[:, :p], cache)[:, -1]
    return logits, torch.full((batch,), p, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------
# text streaming


class TextStreamer:
    """Print the decoded text of row 0 as tokens arrive (for ``mixlab generate``).

    Decodes the whole generated sequence each time and prints the new suffix, holding back while
    the text ends in an incomplete UTF-8 character (``\\ufffd``), so multi-byte characters split
    across tokens print whole.
    """

    def __init__(self, tokenizer: Any, file: TextIO | None = None, stop_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.file = file if file is not None else sys.stdout
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.printed = 0
        self.pad_seen = False

    def put(self, value: torch.Tensor) -> None:
        tok = int(value.reshape(-1)[0])
        if self.pad_seen or tok in self.stop_ids:
            self.pad_seen = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.file.write(text[self.printed :])
        self.file.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.file.write(text[self.printed :] + "\n")
        self.file.flush()
        self.printed = len(text)
