"""Evaluation: perplexity / bits per byte and length extrapolation, MQAR, NIAH, lm-eval harness.

    from mixlab.eval import evaluate
    results = evaluate("runs/gdn", ["ppl", "mqar", "niah", "harness:lambada_openai"])

Each task also has its own module: :mod:`~mixlab.eval.ppl`, :mod:`~mixlab.eval.mqar`,
:mod:`~mixlab.eval.niah`, :mod:`~mixlab.eval.harness` (optional ``lm-eval``).
"""

from mixlab.eval.api import BUILTIN_TASKS, evaluate, parse_tasks

__all__ = ["BUILTIN_TASKS", "evaluate", "parse_tasks"]
