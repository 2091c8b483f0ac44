"""NIAH: prompt construction (length, depth, haystacks, values) and exact-match scoring end to end."""

from __future__ import annotations

import random
import re

import pytest
import torch
from torch import nn

from mixlab.data.tokenizer import ByteTokenizer
from mixlab.eval.niah import NOISE, essay_sentences, evaluate_niah, extract_value, make_sample, score

TOK = ByteTokenizer()
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _needle_span(s) -> tuple[int, int]:
    needle = f"One of the special magic {s.kind}s for {s.key} is: {s.value}."
    assert s.prompt.count(needle) == 1
    start = s.prompt.index(needle)
    return start, start + len(needle)


@pytest.mark.parametrize("variant", ["niah_1", "niah_2", "niah_3"])
def test_prompt_fills_the_length_and_holds_one_needle(variant: str) -> None:
    rng = random.Random(0)
    s = make_sample(variant, 1024, 50.0, TOK, rng)
    assert s.prompt_ids == TOK.encode(s.prompt)
    longest = max(len(x) for x in (essay_sentences() if variant != "niah_1" else NOISE.split(". ")))
    assert 1024 - longest - 2 <= len(s.prompt_ids) <= 1024
    _needle_span(s)
    assert s.prompt.endswith(f"The special magic {s.kind} for {s.key} mentioned in the provided text is")
    assert re.fullmatch(r"[a-z]+-[a-z]+", s.key)
    if s.kind == "number":
        assert re.fullmatch(r"[1-9]\d{6}", s.value)
    else:
        assert UUID_RE.match(s.value)
    body = s.prompt.split("\n")[1]
    if variant == "niah_1":  # the noise haystack only: its 5 sentences and the needle
        rest = body.replace(_needle_span_text(s), "")
        assert set(x.strip() for x in re.split(r"(?<=\.)\s", rest) if x.strip()) <= set(
            x.strip() for x in re.split(r"(?<=\.)\s", NOISE)
        )


def _needle_span_text(s) -> str:
    a, b = _needle_span(s)
    return s.prompt[a:b]


def test_depth_places_the_needle() -> None:
    rng = random.Random(1)
    head_end = {}
    for depth in (0.0, 50.0, 100.0):
        s = make_sample("niah_1", 2048, depth, TOK, rng)
        a, b = _needle_span(s)
        body_start = s.prompt.index("\n") + 1
        body_end = s.prompt.rindex("\nWhat is the special")
        head_end[depth] = (a - body_start) / (body_end - body_start)
        if depth == 0.0:
            assert a == body_start
        if depth == 100.0:
            assert b == body_end
    assert 0.45 < head_end[50.0] < 0.55


def test_bad_settings_are_named() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="unknown NIAH variant"):
        make_sample("niah_9", 1024, 0, TOK, rng)
    with pytest.raises(ValueError, match="depth 120"):
        make_sample("niah_1", 1024, 120, TOK, rng)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        make_sample("niah_1", 50, 0, TOK, rng)
    with pytest.raises(FileNotFoundError, match="haystack file"):
        make_sample("niah_2", 1024, 0, TOK, rng, haystack_file="/nonexistent/essay.txt")


def test_custom_essay_file(tmp_path) -> None:
    f = tmp_path / "essay.txt"
    f.write_text("Alpha beta gamma. Delta epsilon zeta! Eta theta iota? " * 20)
    s = make_sample("niah_2", 512, 25.0, TOK, random.Random(2), haystack_file=str(f))
    assert "Delta epsilon zeta!" in s.prompt and len(s.prompt_ids) <= 512


def test_exact_match_scoring_by_hand() -> None:
    assert score(" 1234567.", "1234567", "number")
    assert score(" is 1234567\nmore", "1234567", "number")
    assert not score(" 12345678", "1234567", "number")
    assert not score(" 123456", "1234567", "number")
    assert not score(" none", "1234567", "number")
    u = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert score(f" {u}.", u, "uuid")
    assert not score(f" {u[:-1]}", u, "uuid")
    assert extract_value(" abc", "uuid") == ""


class _Cache:
    def __init__(self, batch: int) -> None:
        self.hist: list[list[int]] = [[] for _ in range(batch)]


class Oracle(nn.Module):
    """Reads the needle for the asked key from its history and spells the value (byte tokens);
    ``window`` limits how far back it can read, ``corrupt`` makes it answer a wrong last digit."""

    def __init__(self, window: int | None = None, corrupt: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.window, self.corrupt = window, corrupt
        self.config = type("C", (), {"vocab_size": 257})()

    def init_cache(self, batch, max_len, device=None, dtype=None):
        return _Cache(batch)

    def forward(self, ids: torch.Tensor, cache: _Cache) -> torch.Tensor:
        B, T = ids.shape
        logits = torch.zeros(B, T, 257)
        for b in range(B):
            cache.hist[b].extend(ids[b].tolist())
            text = bytes(t for t in cache.hist[b] if t < 256).decode()
            m = list(re.finditer(r"special magic (\w+) for (\S+) mentioned in the provided text is", text))
            nxt = "\n"
            if m:
                q = m[-1]
                seen = text[-self.window :] if self.window else text
                found = re.search(rf"magic {q.group(1)}s for {re.escape(q.group(2))} is: (\S+)\.", seen)
                answer = " " + found.group(1) if found else " unknown"
                if self.corrupt:
                    answer = answer[:-1] + ("0" if answer[-1] != "0" else "1")
                done = len(text) - q.end()
                nxt = answer[done] if done < len(answer) else "\n"
            logits[b, -1, nxt.encode()[0]] = 10.0
        return logits


def test_evaluate_niah_end_to_end_with_controlled_models() -> None:
    kw = dict(variants=["niah_1", "niah_3"], lengths=[512], depths=[0.0, 100.0], samples=2, batch_size=1)
    perfect = evaluate_niah(Oracle(), TOK, **kw)
    assert perfect["accuracy"] == 1.0
    cell = perfect["variants"]["niah_3"]["cells"][0]
    assert cell["examples"][0]["generated"].startswith(" " + cell["examples"][0]["value"])
    assert evaluate_niah(Oracle(corrupt=True), TOK, **kw)["accuracy"] == 0.0
    # a model that only sees the last 300 bytes finds the needle at depth 100% but not at 0%
    short = evaluate_niah(Oracle(window=300), TOK, **kw)
    for v in short["variants"].values():
        assert [c["accuracy"] for c in v["cells"]] == [0.0, 1.0]
        assert v["by_length"] == {"512": 0.5}
