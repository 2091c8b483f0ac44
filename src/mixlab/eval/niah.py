"""Single needle in a haystack (RULER's S-NIAH-1/2/3), offline.

A needle ``One of the special magic numbers for {key} is: {value}.`` is hidden at a depth of 0-100%
of a haystack; the prompt ends with RULER's answer prefix (``... The special magic number for
{key} mentioned in the provided text is``) and the model continues greedily. The score is exact
match: the first value-shaped string of the continuation (a run of digits, or a UUID) must equal
the needle's value.

========  ==========================================================  ======================
variant   haystack                                                    value
========  ==========================================================  ======================
niah_1    the noise sentences repeated (:data:`NOISE`)                a 7-digit number
niah_2    an essay: any long local text (default: the module          a 7-digit number
          docstrings of the Python standard library, always present)
niah_3    the same essay                                              a UUID
========  ==========================================================  ======================

Lengths are in tokens of the model's tokenizer: the prompt (instruction, haystack, needle,
question) is filled with whole haystack sentences up to the target length. Keys are
adjective-noun pairs (``"shaggy-harbor"``) as in RULER.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "NOISE",
    "VARIANTS",
    "NiahSample",
    "essay_sentences",
    "evaluate_niah",
    "extract_value",
    "make_sample",
    "score",
]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
#: variant -> (haystack, value kind)
VARIANTS: dict[str, tuple[str, str]] = {
    "niah_1": ("noise", "number"),
    "niah_2": ("essay", "number"),
    "niah_3": ("essay", "uuid"),
}
_PLURAL = {"number": "numbers", "uuid": "uuids"}
_ADJECTIVES = [
    "shaggy",
    "amber",
    "brave",
    "calm",
    "dusty",
    "eager",
    "fancy",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "misty",
    "noisy",
    "odd",
    "proud",
    "quiet",
    "rusty",
    "silent",
    "tidy",
    "upbeat",
    "vivid",
    "wary",
    "young",
    "zesty",
    "bitter",
    "cosmic",
    "famous",
    "humble",
]
_NOUNS = [
    "harbor",
    "cabin",
    "meadow",
    "lantern",
    "falcon",
    "river",
    "canyon",
    "garden",
    "violin",
    "glacier",
    "orchard",
    "compass",
    "beacon",
    "willow",
    "summit",
    "marble",
    "anchor",
    "pebble",
    "thunder",
    "ember",
    "saddle",
    "quarry",
    "harvest",
    "ribbon",
]
_VALUE_RE = {
    "number": re.compile(r"\d+"),
    "uuid": re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F-]{6,}"),
}


@dataclass
class NiahSample:
    """One test prompt. ``length``: target prompt length in tokens; ``depth``: needle depth in %."""

    variant: str
    length: int
    depth: float
    key: str
    value: str
    kind: str
    prompt: str
    prompt_ids: list[int]


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])", text)
    return [p.strip() for p in parts if len(p.strip()) > 1]


@lru_cache(maxsize=4)
def essay_sentences(path: str | None = None, max_chars: int = 400_000) -> tuple[str, ...]:
    """Sentences of the essay haystack: the text file ``path``, or (None) the module docstrings of
    the Python standard library in a fixed order (prose that every machine has)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"NIAH haystack file {str(p)!r} does not exist")
        sents = _sentences(p.read_text(encoding="utf-8", errors="replace"))
    else:
        from mixlab.data.corpus import stdlib_files

        doc_re = re.compile(r'\A(?:\s*#[^\n]*\n|\s)*[rRuU]?("""|\'\'\')(.*?)\1', re.S)
        chunks, total = [], 0
        for f in stdlib_files():
            try:
                m = doc_re.match(f.path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            if m and len(m.group(2)) > 200:
                chunks.append(m.group(2))
                total += len(m.group(2))
                if total >= max_chars:
                    break
        sents = _sentences("\n".join(chunks))
        # keep prose: drop doctest lines, code and tables
        sents = [s for s in sents if s[0].isupper() and ">>>" not in s and sum(c.isalpha() for c in s) > 0.7 * len(s)]
    if not sents:
        raise ValueError(f"the NIAH haystack {path or 'stdlib docstrings'} holds no sentences")
    return tuple(sents)


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_sample(
    variant: str,
    length: int,
    depth: float,
    tokenizer: Any,
    rng: random.Random,
    haystack_file: str | None = None,
) -> NiahSample:
    """One prompt of ``variant`` filled to at most ``length`` tokens with the needle at ``depth`` %."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown NIAH variant {variant!r}; available: {', '.join(VARIANTS)}")
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"NIAH depth {depth} must be in [0, 100] (percent)")
    hay, kind = VARIANTS[variant]
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    value = _value(kind, rng)
    plural, singular = _PLURAL[kind], kind
    head = (
        f"Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {plural} afterwards.\n"
    )
    needle = f"One of the special magic {plural} for {key} is: {value}."
    question = (
        f"\nWhat is the special magic {singular} for {key} mentioned in the provided text? "
        f"The special magic {singular} for {key} mentioned in the provided text is"
    )
    pool = _sentences(NOISE) if hay == "noise" else list(essay_sentences(haystack_file))
    start = 0 if hay == "noise" else rng.randrange(len(pool))
    fixed = len(tokenizer.encode(head + needle + " " + question))
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"NIAH length {length} is shorter than the prompt without haystack ({fixed} tokens)")
    # whole sentences until the budget is spent (counted per sentence, then checked on the whole prompt)
    hay_sents: list[str] = []
    used, i = 0, start
    while True:
        s = pool[i % len(pool)]
        n = len(tokenizer.encode(" " + s))
        if used + n > budget:
            break
        hay_sents.append(s)
        used += n
        i += 1

    def build(sents: list[str]) -> tuple[str, list[int]]:
        at = round(depth / 100.0 * len(sents))
        context = " ".join([*sents[:at], needle, *sents[at:]])
        prompt = head + context + question
        return prompt, tokenizer.encode(prompt)

    prompt, ids = build(hay_sents)
    while len(ids) > length and hay_sents:  # a subword tokenizer may merge across sentence joins
        hay_sents.pop()
        prompt, ids = build(hay_sents)
    return NiahSample(variant, length, depth, key, value, kind, prompt, ids)


def extract_value(text: str, kind: str) -> str:
    """The first value-shaped string of a continuation: a run of digits, or a UUID; '' if none."""
    m = _VALUE_RE[kind].search(text)
    return m.group(0) if m else ""


def score(continuation: str, value: str, kind: str) -> bool:
    """Exact match of the continuation's first value-shaped string against ``value``."""
    return extract_value(continuation, kind) == value


@torch.no_grad()
def evaluate_niah(
    model: nn.Module,
    tokenizer: Any,
    variants: Sequence[str] = tuple(VARIANTS),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    haystack_file: str | None = None,
    log=None,
) -> dict[str, Any]:
    """Greedy-decoding NIAH accuracy of ``model`` per variant, length and depth.

    Returns ``{"variants": {variant: {"accuracy", "by_length": {length: acc}, "cells": [{"length",
    "depth", "accuracy", "examples": [{"value", "generated"}]}]}}, "accuracy"}``."""
    from mixlab.generate import generate

    rng = random.Random(seed)
    out: dict[str, Any] = {"lengths": list(lengths), "depths": list(depths), "samples": samples, "variants": {}}
    for variant in variants:
        cells, hits_by_len = [], {}
        for length in lengths:
            for depth in depths:
                batch = [make_sample(variant, length, depth, tokenizer, rng, haystack_file) for _ in range(samples)]
                hits, examples = 0, []
                for i in range(0, len(batch), batch_size):
                    part = batch[i : i + batch_size]
                    max_new = max(len(tokenizer.encode(" " + s.value)) for s in part) + 4
                    gen = generate(model, [s.prompt_ids for s in part], max_new, temperature=0.0)
                    for s, ids in zip(part, gen):
                        text = tokenizer.decode(ids[len(s.prompt_ids) :])
                        ok = score(text, s.value, s.kind)
                        hits += ok
                        examples.append({"value": s.value, "generated": text, "correct": ok})
                acc = hits / max(len(batch), 1)
                cells.append({"length": length, "depth": depth, "accuracy": acc, "examples": examples})
                hits_by_len.setdefault(length, []).append(acc)
                if log is not None:
                    log(f"niah {variant} length {length} depth {depth:g}%: {acc:.2f}")
        by_len = {str(k): sum(v) / len(v) for k, v in hits_by_len.items()}
        out["variants"][variant] = {
            "accuracy": sum(c["accuracy"] for c in cells) / max(len(cells), 1),
            "by_length": by_len,
            "cells": cells,
        }
    accs = [v["accuracy"] for v in out["variants"].values()]
    out["accuracy"] = sum(accs) / max(len(accs), 1)
    return out
