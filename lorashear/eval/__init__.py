"""Evaluators for dense and pruned models: perplexity on local text, a local HellaSwag-style
multiple-choice task, and lm-eval harness tasks on an in-memory model.

Every evaluator takes any causal LM callable ``model(input_ids=..., attention_mask=...)`` that
returns ``.logits`` (a transformers model or the module lorashear emits). lm-eval is imported
only by :mod:`lorashear.eval.harness`, when it is used.
"""

from lorashear.eval._scoring import ContinuationScore, EvaluationError, score_continuations
from lorashear.eval.local_task import (
    LOCAL_TASK_NAME,
    MultipleChoiceItem,
    MultipleChoiceResult,
    build_local_task,
    score_multiple_choice,
    split_sentences,
)
from lorashear.eval.perplexity import (
    PerplexityResult,
    perplexity,
    split_windows,
    text_perplexity,
    tokenize_text,
)

__all__ = [
    "LOCAL_TASK_NAME", "ContinuationScore", "EvaluationError", "MultipleChoiceItem",
    "MultipleChoiceResult", "PerplexityResult", "build_local_task", "perplexity",
    "score_continuations", "score_multiple_choice", "split_sentences", "split_windows",
    "text_perplexity", "tokenize_text",
]
