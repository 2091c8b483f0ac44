"""lm-evaluation-harness adapter: any mixlab model as an ``lm_eval.api.model.LM``.

    from mixlab.eval.harness import MixlabLM, evaluate_harness
    lm = MixlabLM(model, tokenizer, max_length=2048)
    results = evaluate_harness(lm, ["lambada_openai", "hellaswag"])      # {task: {metric: value}}

or ``mixlab eval RUN --tasks harness:lambada_openai,hellaswag``. ``lm-eval`` is an optional extra
(``pip install 'mixlab[eval]'``); importing this module without it is fine, using it fails with
the install command.

Offline: the harness runs with the Hugging Face hub switched to offline mode, so a task runs when
its dataset is in the local cache (``HF_HOME`` / ``HF_DATASETS_CACHE``) and otherwise fails with
:class:`HarnessDataError` naming the task and what to do. Tasks over local files (``dataset_path:
json`` with ``data_files``) need nothing: put their YAML in a directory and pass it as
``include_path``.

Scoring follows the harness's Hugging Face model: a context's trailing whitespace moves to the
continuation; an empty context is conditioned on EOS; inputs longer than ``max_length`` keep their
last ``max_length`` tokens; rolling log-likelihoods use the harness's disjoint windows with EOS as
the prefix; generation is greedy and stops at the request's ``until`` strings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HarnessDataError", "MixlabLM", "evaluate_harness", "require_lm_eval"]

_INSTALL = "the lm-evaluation-harness is not installed: pip install lm-eval (or pip install 'mixlab[eval]')"


class HarnessDataError(RuntimeError):
    """An lm-eval task's dataset is not available offline."""


def require_lm_eval() -> Any:
    """Import ``lm_eval`` or fail with the install command."""
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from None
    return lm_eval


def _base() -> type:
    try:
        from lm_eval.api.model import LM

        return LM
    except ImportError:
        return object


class MixlabLM(_base()):  # type: ignore[misc]
    """A mixlab model + tokenizer as an lm-eval ``LM`` (loglikelihood, loglikelihood_rolling,
    generate_until). ``max_length``: the context window in tokens (default 2048)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int = 2048,
        batch_size: int = 8,
        max_gen_toks: int = 256,
    ) -> None:
        require_lm_eval()
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.eot_token_id = int(tokenizer.eos_id)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}")

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return repr(self.tokenizer)

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx) :]
        if not context:
            ctx = [self.eot_token_id]
            cont = whole
        return ctx, cont

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), greedy)`` of each ``(context ids, continuation ids)``.

        Inputs are right-padded into batches: causal models never look right, so padding changes
        nothing at the scored positions."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            rows, spans = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    spans.append((0, 0))
                    rows.append([self.eot_token_id])
                    continue
                full = (ctx + cont)[-(self.max_length + 1) :]
                inp = full[:-1]
                spans.append((len(inp) - len(cont), len(inp)))
                rows.append(inp)
            width = max(len(r) for r in rows)
            x = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, : len(row)] = torch.tensor(row)
            logits = self.model(x.to(self.device))
            logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            for r, i in enumerate(idx):
                a, b = spans[r]
                if a == b:
                    out[i] = (0.0, True)
                    continue
                target = torch.tensor(pairs[i][1], device=logp.device)
                lp = logp[r, a:b]
                ll = float(lp.gather(1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (ll, greedy)
        return out

    # ------------------------------------------------------------------ the LM interface

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            out.append(sum(ll for ll, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from mixlab.generate import generate

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            eos_text = self.tokenizer.decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0))
            do_sample = bool(kwargs.pop("do_sample", False))
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-max(1, self.max_length - max_new) :]
            gen = generate(
                self.model,
                [ids],
                max_new,
                temperature=temperature if do_sample else 0.0,
                eos_token_id=self.eot_token_id,
            )[0][len(ids) :]
            text = self.tokenizer.decode([t for t in gen if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Switch the Hugging Face hub and datasets to offline mode for the duration."""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    patched: list[tuple[Any, str, Any]] = []
    for mod_name, attrs in (
        ("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
    ):
        try:
            mod = __import__(mod_name, fromlist=["_"])
        except ImportError:
            continue
        for a in attrs:
            if hasattr(mod, a):
                patched.append((mod, a, getattr(mod, a)))
                setattr(mod, a, True)
    try:
        yield
    finally:
        for mod, a, v in patched:
            setattr(mod, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_MISSING_HINTS = (
    "offline",
    "connection",
    "couldn't reach",
    "could not reach",
    "not found",
    "doesn't exist",
    "no such file",
)


def evaluate_harness(
    lm: Any,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    offline: bool = True,
    include_defaults: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on ``lm`` (a :class:`MixlabLM`) through ``lm_eval.simple_evaluate``.

    Returns ``{task: {metric: value}}`` (the harness's ``results``). ``include_path``: a directory
    of extra task YAMLs; ``include_defaults=False`` looks tasks up there only (the harness's own
    few thousand task files are not indexed); ``limit``: examples per task (testing only)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("harness: name at least one task, e.g. harness:lambada_openai,hellaswag")
    with _offline() if offline else contextlib.nullcontext():
        # indexing the harness's own few thousand task YAMLs takes a while: skip it when the
        # include_path alone holds every requested task
        tm = None
        if include_path is not None:
            tm = TaskManager(include_path=include_path, include_defaults=False)
            if not set(tasks) <= set(tm.all_tasks):
                tm = None
        if tm is None:
            tm = TaskManager(include_path=include_path, include_defaults=include_defaults)
        known = set(tm.all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            import difflib

            hints = {t: difflib.get_close_matches(t, sorted(known), n=3) for t in unknown}
            raise ValueError(
                "unknown lm-eval task(s): "
                + "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
                + (
                    "; tasks over local files go in a YAML directory passed as include_path"
                    if include_path is None
                    else ""
                )
            )
        try:
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=tm,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
            )
        except Exception as e:
            msg = str(e)
            if offline and (
                isinstance(e, (ConnectionError, OSError, FileNotFoundError))
                or type(e).__name__ in ("DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError")
                or any(h in msg.lower() for h in _MISSING_HINTS)
            ):
                cache = os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
                raise HarnessDataError(
                    f"lm-eval task(s) {', '.join(tasks)}: the dataset is not in the local Hugging Face cache "
                    f"({cache}) and mixlab runs the harness offline ({type(e).__name__}: {msg.splitlines()[0] if msg else ''}). "
                    "Fetch it once where there is network (e.g. `lm_eval --model dummy --tasks TASK --limit 1`, "
                    "or datasets.load_dataset) and copy the cache here, or describe a local JSONL as a task YAML "
                    "(dataset_path: json, dataset_kwargs.data_files) in a directory passed with --harness-include."
                ) from e
            raise
    if res is None:
        return {}
    return {task: dict(metrics) for task, metrics in res.get("results", {}).items()}
