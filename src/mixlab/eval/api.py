"""``evaluate(model_dir_or_model, tasks)``: the one entry point behind ``mixlab eval``.

Tasks (any mix, comma-separated or a list):

- ``ppl``: perplexity and bits per byte on held-out text (the run's own held-out split, or
  ``text=PATH``), in windows of the training length (``ppl_mode="state"``: carried state), plus the
  length-extrapolation curve up to ``factor`` × the training length (``length``: the curve alone).
- ``mqar``: MQAR accuracy; a model trained with ``task=mqar`` is tested on its own setting, any
  other on Zoology's sweep :data:`~mixlab.eval.mqar.MQAR_SWEEP` (``mqar_configs`` overrides).
- ``niah``: S-NIAH-1/2/3 by length and depth (:mod:`mixlab.eval.niah`).
- ``synthetic``: accuracy of a run trained with ``task=mqar`` / ``selective_copying`` on a held-out
  set of its own task and settings.
- ``harness:TASK1,TASK2``: lm-evaluation-harness tasks (every name after ``harness:`` that is not
  one of the above).

Returns ``{"model": ..., "params": ..., "train_len": ..., "<task>": results}``; with ``out`` the
results are merged into that JSON file (``eval.json`` of the run by default from the CLI).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BUILTIN_TASKS", "evaluate", "parse_tasks"]

BUILTIN_TASKS = ("ppl", "length", "mqar", "niah", "synthetic")


def parse_tasks(tasks: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """``"ppl,mqar,harness:hellaswag,arc_easy"`` -> ``(["ppl", "mqar"], ["hellaswag", "arc_easy"])``."""
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) for t in t.split(",")]
    builtin, harness, in_harness = [], [], False
    for t in items:
        if not t:
            continue
        if t.startswith("harness:"):
            in_harness = True
            t = t[len("harness:") :].strip()
            if t:
                harness.append(t)
            continue
        if t in BUILTIN_TASKS:
            builtin.append(t)
            in_harness = False
        elif in_harness:
            harness.append(t)
        else:
            raise ValueError(
                f"unknown eval task {t!r}; built-in: {', '.join(BUILTIN_TASKS)}; lm-eval tasks go after "
                f"'harness:' (e.g. harness:{t})"
            )
    if not builtin and not harness:
        raise ValueError(f"no eval task given; choose from {', '.join(BUILTIN_TASKS)}, harness:TASKS")
    return list(dict.fromkeys(builtin)), list(dict.fromkeys(harness))


def _run_config(path: Path) -> dict[str, Any]:
    import yaml

    f = path / "config.yaml"
    return (yaml.safe_load(f.read_text()) or {}) if f.is_file() else {}


def _load(
    model_dir_or_model: str | Path | nn.Module, tokenizer: Any, device: str, dtype: torch.dtype | None
) -> tuple[nn.Module, Any, dict[str, Any], str]:
    if isinstance(model_dir_or_model, nn.Module):
        return model_dir_or_model, tokenizer, {}, type(model_dir_or_model).__name__
    from mixlab.models.hub import from_pretrained, load_tokenizer_for

    path = Path(model_dir_or_model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(path, device=device, dtype=dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer_for(path)
    elif isinstance(tokenizer, str):
        from mixlab.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer, _run_config(path), str(path)


def _need_tokenizer(tokenizer: Any, task: str) -> Any:
    if tokenizer is None:
        raise ValueError(
            f"eval task {task!r} needs a tokenizer and the model directory names none; pass tokenizer= "
            "(CLI: --tokenizer PATH or 'byte')"
        )
    return tokenizer


def evaluate(
    model_dir_or_model: str | Path | nn.Module,
    tasks: str | Sequence[str],
    *,
    tokenizer: Any = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    out: str | Path | None = None,
    log=print,
    # ppl / length
    text: str | None = None,
    train_len: int | None = None,
    ppl_mode: str = "window",
    context: int | None = None,
    stride: int | None = None,
    chunk: int = 1024,
    max_tokens: int = 200_000,
    factor: int = 4,
    batch_size: int = 8,
    # mqar
    mqar_configs: Sequence[tuple[int, int]] | None = None,
    mqar_examples: int = 1000,
    # niah
    niah_variants: Sequence[str] | None = None,
    niah_lengths: Sequence[int] | None = None,
    niah_depths: Sequence[float] | None = None,
    niah_samples: int = 4,
    haystack: str | None = None,
    # harness
    harness_include: str | None = None,
    harness_limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run / model directory (or a model object with ``tokenizer=``) on ``tasks``.

    ``train_len``: the training sequence length (default: the run's ``data.seq_len``, else 2048);
    it is the default ppl window and the unit of the length curve. See the module doc for tasks."""
    builtin, harness_tasks = parse_tasks(tasks)
    model, tok, run_cfg, name = _load(model_dir_or_model, tokenizer, device, dtype)
    model.eval()
    data_cfg = run_cfg.get("data") or {}
    train_len = int(train_len or data_cfg.get("seq_len") or 2048)
    results: dict[str, Any] = {
        "model": name,
        "params": int(model.num_parameters()) if hasattr(model, "num_parameters") else None,
        "train_len": train_len,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

    if "ppl" in builtin or "length" in builtin:
        from mixlab.eval.ppl import heldout_documents, length_curve, perplexity

        tok = _need_tokenizer(tok, "ppl")
        source: Any = text
        if source is None:
            if run_cfg.get("task", "text") != "text":
                raise ValueError("this run trained on a synthetic task; ppl needs held-out text: pass text=PATH")
            if not data_cfg:
                raise ValueError("ppl: the model directory is not a run (no config.yaml); pass held-out text=PATH")
            source = data_cfg
        t0 = time.perf_counter()
        docs, stream = heldout_documents(source, tok, max_tokens=max_tokens)
        if "ppl" in builtin:
            results["ppl"] = perplexity(
                model, docs, tok.eos_id, tokenizer=tok, mode=ppl_mode, context=context or train_len,
                stride=stride, chunk=chunk, batch_size=batch_size,
            )  # fmt: skip
            r = results["ppl"]
            log(f"ppl: {r['ppl']:.3f}  bits/byte {r['bits_per_byte']:.4f}  ({r['tokens']:,} tokens, {ppl_mode} mode)")
        try:
            results["length"] = length_curve(model, stream, train_len, factor=factor)
            c = results["length"]
            beyond = f"{c['loss_beyond']:.4f}" if c["loss_beyond"] is not None else "n/a"
            log(f"length: loss within {train_len} tokens {c['loss_within']:.4f}, beyond (to {c['length']}) {beyond}")
        except ValueError as e:
            if "length" in builtin:
                raise
            results["length"] = {"skipped": str(e)}
            log(f"length curve skipped: {e}")
        results["ppl_seconds"] = time.perf_counter() - t0

    if "mqar" in builtin:
        from mixlab.eval.mqar import MQAR_SWEEP, evaluate_mqar

        syn = run_cfg.get("synthetic") or {}
        vocab = None
        if mqar_configs is None:
            if run_cfg.get("task") == "mqar":
                mqar_configs = [(int(data_cfg.get("seq_len", 256)), int(syn.get("num_kv_pairs", 16)))]
            else:
                mqar_configs = MQAR_SWEEP
        if run_cfg.get("task") == "mqar":
            vocab = int(syn.get("vocab_size", 8192))
        elif run_cfg.get("task", "text") != "text":
            raise ValueError(f"this run trained on {run_cfg['task']}; evaluate it with the task 'synthetic'")
        results["mqar"] = evaluate_mqar(model, mqar_configs, vocab_size=vocab, examples=mqar_examples)
        for r in results["mqar"]["results"]:
            log(f"mqar: L={r['seq_len']} kv={r['num_kv_pairs']}: accuracy {r['accuracy']:.4f}")

    if "synthetic" in builtin:
        from mixlab.data.synthetic import SyntheticLoader
        from mixlab.eval.mqar import TEST_SEED, labeled_accuracy

        task = run_cfg.get("task", "text")
        if task == "text":
            raise ValueError("eval task 'synthetic' needs a run trained with task=mqar or task=selective_copying")
        syn = dict(run_cfg.get("synthetic") or {})
        syn["eval_examples"] = mqar_examples
        loader = SyntheticLoader(task, syn, int(data_cfg.get("seq_len", 256)), batch_size * 8, TEST_SEED)
        results["synthetic"] = {"task": task, **labeled_accuracy(model, loader.eval_batches())}
        log(f"{task}: accuracy {results['synthetic']['accuracy']:.4f} ({results['synthetic']['targets']} targets)")

    if "niah" in builtin:
        from mixlab.eval.niah import DEFAULT_DEPTHS, DEFAULT_LENGTHS, VARIANTS, evaluate_niah

        results["niah"] = evaluate_niah(
            model, _need_tokenizer(tok, "niah"),
            variants=niah_variants or tuple(VARIANTS), lengths=niah_lengths or DEFAULT_LENGTHS,
            depths=niah_depths or DEFAULT_DEPTHS, samples=niah_samples, haystack_file=haystack,
        )  # fmt: skip
        for v, r in results["niah"]["variants"].items():
            log(f"niah {v}: " + "  ".join(f"{k}:{a:.2f}" for k, a in r["by_length"].items()))

    if harness_tasks:
        from mixlab.eval.harness import MixlabLM, evaluate_harness

        lm = MixlabLM(model, _need_tokenizer(tok, "harness"), max_length=context or train_len, batch_size=batch_size)
        results["harness"] = evaluate_harness(
            lm, harness_tasks, include_path=harness_include, num_fewshot=num_fewshot, limit=harness_limit
        )
        for task, metrics in results["harness"].items():
            shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
            log(f"harness {task}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))

    if out is not None:
        _merge_json(Path(out), results)
    return results


def _merge_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` into ``path``, keeping the other tasks' results already there."""
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    old.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(old, indent=2, default=float) + "\n")
    tmp.replace(path)
