"""Multi-query associative recall (MQAR): accuracy of a model on Zoology's generator.

The generator lives in :mod:`mixlab.data.synthetic` (training uses it too: ``mixlab train
task=mqar``). Accuracy is over queries: the fraction of query positions whose argmax prediction is
the key's value (``labels != -100``), pooled over the whole test set.

Zoology's standard sweep is :data:`MQAR_SWEEP`: (sequence length, key-value pairs) = (64, 4),
(128, 8), (256, 16), (512, 64), on 2-layer models of d_model 64-512 with a vocabulary of 8192.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mixlab.data.synthetic import IGNORE_INDEX, LabeledBatch, SyntheticLoader

__all__ = ["MQAR_SWEEP", "MQAR_VOCAB", "evaluate_mqar", "labeled_accuracy", "mqar_test_set"]

MQAR_SWEEP: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (512, 64))
MQAR_VOCAB = 8192
#: held-out data come from their own seed as well as their own stream, so a model trained with
#: seed 0 is never tested on a sequence it might have been trained on.
TEST_SEED = 1_000_003


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def labeled_accuracy(model: nn.Module, batches: Iterable[LabeledBatch]) -> dict[str, float]:
    """Accuracy and mean loss over the scored positions of ``batches``.

    Returns ``{"accuracy", "loss", "targets", "sequences", "sequence_accuracy"}`` where
    ``sequence_accuracy`` is the fraction of sequences with every target right."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    correct = total = seqs = seqs_ok = 0
    loss_sum = 0.0
    try:
        for b in batches:
            b = b.to(device)
            logits = model(b.inputs).float()  # [B, T, V]
            mask = b.labels != IGNORE_INDEX
            pred = logits.argmax(-1)
            hit = (pred == b.labels) & mask
            correct += int(hit.sum())
            total += int(mask.sum())
            seqs += b.inputs.shape[0]
            seqs_ok += int((hit.sum(1) == mask.sum(1)).sum())
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("labeled_accuracy: the batches hold no scored position (labels are all -100)")
    return {
        "accuracy": correct / total,
        "loss": loss_sum / total,
        "targets": total,
        "sequences": seqs,
        "sequence_accuracy": seqs_ok / max(seqs, 1),
    }


def mqar_test_set(
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = MQAR_VOCAB,
    examples: int = 1000,
    batch_size: int = 64,
    seed: int = TEST_SEED,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> list[LabeledBatch]:
    """A fixed MQAR test set: ``examples`` sequences in batches ``[batch_size, seq_len]``."""
    params = {
        "num_kv_pairs": num_kv_pairs,
        "vocab_size": vocab_size,
        "power_a": power_a,
        "random_non_queries": random_non_queries,
        "eval_examples": examples,
    }
    return SyntheticLoader("mqar", params, seq_len, batch_size, seed).eval_batches(batch_size)


def evaluate_mqar(
    model: nn.Module,
    configs: Iterable[tuple[int, int]] = MQAR_SWEEP,
    vocab_size: int | None = None,
    examples: int = 1000,
    batch_size: int = 64,
    seed: int = TEST_SEED,
) -> dict[str, Any]:
    """MQAR accuracy of ``model`` at each ``(seq_len, num_kv_pairs)`` of ``configs``.

    ``vocab_size``: the task's vocabulary (default: 8192, or the model's when smaller). Returns
    ``{"vocab_size", "results": [{"seq_len", "num_kv_pairs", "accuracy", ...}], "accuracy"}`` with
    ``accuracy`` the mean over configs."""
    model_vocab = int(model.config.vocab_size) if hasattr(model, "config") else None
    vocab = vocab_size or (min(MQAR_VOCAB, model_vocab) if model_vocab else MQAR_VOCAB)
    if model_vocab is not None and vocab > model_vocab:
        raise ValueError(
            f"MQAR vocabulary {vocab} is larger than the model's ({model_vocab}); pass a vocab_size <= {model_vocab}"
        )
    results = []
    for seq_len, kv in configs:
        test = mqar_test_set(seq_len, kv, vocab, examples, batch_size, seed)
        row = {"seq_len": seq_len, "num_kv_pairs": kv, **labeled_accuracy(model, test)}
        results.append(row)
    return {
        "vocab_size": vocab,
        "examples": examples,
        "results": results,
        "accuracy": sum(r["accuracy"] for r in results) / max(len(results), 1),
    }
