"""What every evaluator shares: calling a causal LM callable, and scoring continuations.

An evaluated model is any callable ``model(input_ids=..., attention_mask=...)`` returning an
object with ``.logits`` of shape ``[batch, time, vocab]``: a transformers model or the module
lorashear emits. Nothing here assumes more, so a pruned, non-uniform model is scored by exactly
the same code as the dense one it came from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorashear.errors import LorashearError


class EvaluationError(LorashearError):
    """A model or its inputs cannot be evaluated (wrong output type, text too short, ...)."""


def model_device(model: object) -> torch.device:
    """The device of the model's first parameter; CPU for a callable without parameters."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def inference_mode(model: object) -> Iterator[None]:
    """Run the body in eval mode without gradients, then restore the model's training flag.

    Evaluation must be deterministic (no dropout) but must not leave a model that is being
    fine-tuned switched to eval mode behind the caller's back.
    """
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def forward_logits(model: object, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Call ``model`` on a batch and return its logits as float32 ``[batch, time, vocab]``."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 \
            or logits.shape[:2] != input_ids.shape:
        raise EvaluationError(
            f"the model returned {type(output).__name__}, not logits of shape "
            f"[{input_ids.shape[0]}, {input_ids.shape[1]}, vocab]",
            hint="an evaluated model must return an object with a .logits tensor")
    return logits.float()


@dataclass(frozen=True)
class ContinuationScore:
    """How likely a model finds a continuation after a context."""

    loglikelihood: float
    """Sum of the log-probabilities of the continuation's tokens."""
    is_greedy: bool
    """Whether every continuation token is the model's argmax prediction."""
    tokens: int
    """How many continuation tokens were scored."""


def score_continuations(model: object, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        *, batch_size: int = 16, max_length: int = 2048,
                        progress: bool = False,
                        description: str = "scoring") -> list[ContinuationScore]:
    """Score each ``(context_ids, continuation_ids)`` pair by the log-likelihood of the
    continuation given the context, as lm-eval's ``loglikelihood`` does.

    A sequence longer than ``max_length + 1`` tokens loses tokens from the left of its context.
    Requests run longest first (fewer pad tokens per batch) and come back in input order.
    Batches are right-padded: a causal model's logits at real positions never see the pads.
    """
    from tqdm.auto import tqdm

    for index, (context, continuation) in enumerate(requests):
        if len(continuation) == 0:
            raise EvaluationError(f"request {index} has an empty continuation")
        if len(context) == 0:
            raise EvaluationError(f"request {index} has an empty context",
                                  hint="start the context with a BOS/EOS token")
    device = model_device(model)
    order = sorted(range(len(requests)),
                   key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    scores: list[ContinuationScore | None] = [None] * len(requests)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    with inference_mode(model):
        for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
            sequences, continuation_lengths = [], []
            for index in batch:
                context, continuation = requests[index]
                whole = (list(context) + list(continuation))[-(max_length + 1):]
                sequences.append(whole)
                continuation_lengths.append(min(len(continuation), len(whole) - 1))
            width = max(len(sequence) for sequence in sequences) - 1
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, sequence in enumerate(sequences):
                input_ids[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
                attention_mask[row, :len(sequence) - 1] = 1
            log_probs = F.log_softmax(
                forward_logits(model, input_ids.to(device), attention_mask.to(device)), dim=-1)
            for row, (index, sequence) in enumerate(zip(batch, sequences, strict=True)):
                count = continuation_lengths[row]
                end = len(sequence) - 1
                targets = torch.tensor(sequence[end - count + 1:], device=log_probs.device)
                positions = log_probs[row, end - count:end]
                token_scores = positions.gather(-1, targets[:, None]).squeeze(-1)
                greedy = bool((positions.argmax(-1) == targets).all())
                scores[index] = ContinuationScore(float(token_scores.double().sum()), greedy, count)
    return [score for score in scores if score is not None]
