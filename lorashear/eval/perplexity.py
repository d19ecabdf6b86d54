"""Perplexity of a causal LM on local text, over non-overlapping windows.

The text is tokenized once, cut into consecutive windows of ``window_length`` tokens (the
partial tail is dropped so every batch has one shape), and each window is scored on its own:
the first token of a window has no context and is not predicted, so a window contributes
``window_length - 1`` tokens. Perplexity is ``exp`` of the mean negative log-likelihood over
all predicted tokens. This is the protocol of the pruning papers' WikiText-2/PTB tables
(128- and 2048-token windows), applied to whatever held-out text is at hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lorashear.eval._scoring import EvaluationError, forward_logits, inference_mode, model_device

#: Tokens per batch when the caller gives no batch size: bounds the logits tensor
#: (tokens x vocab x 4 bytes, 400 MB for SmolLM2's 49k vocabulary).
DEFAULT_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one text at one window length."""

    ppl: float
    """``exp(mean_nll)``."""
    mean_nll: float
    """Mean negative log-likelihood per predicted token, in nats."""
    tokens: int
    """How many tokens were predicted (``windows * (window_length - 1)``)."""
    windows: int
    """How many windows were scored."""
    window_length: int
    """Tokens per window."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def split_windows(token_ids: Sequence[int] | torch.Tensor, window_length: int,
                  max_windows: int | None = None, *, spread: bool = False) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows: a ``[windows, window_length]`` tensor.

    The partial tail is dropped. With a ``max_windows`` budget, the first windows are kept,
    or with ``spread=True`` windows evenly spaced over the whole text (a fairer sample of a
    book whose opening pages are atypical, at the cost of tokenizing all of it).
    """
    if window_length < 2:
        raise EvaluationError(f"window length must be at least 2, got {window_length}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    available = ids.numel() // window_length
    if available == 0:
        raise EvaluationError(
            f"the text has {ids.numel()} tokens, fewer than one window of {window_length}",
            hint="give a longer text or a shorter window")
    windows = ids[:available * window_length].view(available, window_length)
    if max_windows is None or max_windows >= available:
        return windows
    if max_windows < 1:
        raise EvaluationError(f"max_windows must be positive, got {max_windows}")
    if not spread:
        return windows[:max_windows]
    picked = [index * available // max_windows for index in range(max_windows)]
    return windows[picked]


def perplexity(model: object, token_ids: Sequence[int] | torch.Tensor, *, window_length: int,
               max_windows: int | None = None, spread: bool = False,
               batch_size: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream, over non-overlapping windows.

    ``model`` is any callable ``model(input_ids=..., attention_mask=...)`` returning an
    object with ``.logits``. ``max_windows`` caps the work: the first windows are used (so a
    larger budget extends a smaller one), or evenly spaced ones with ``spread=True``. The
    result is deterministic: no dropout, no sampling, windows in text order.
    """
    from tqdm.auto import tqdm

    windows = split_windows(token_ids, window_length, max_windows, spread=spread)
    if batch_size is None:
        batch_size = max(1, DEFAULT_BATCH_TOKENS // window_length)
    device = model_device(model)
    total_nll = 0.0
    with inference_mode(model):
        for start in tqdm(range(0, windows.shape[0], batch_size), disable=not progress,
                          desc=f"perplexity@{window_length}", leave=False):
            batch = windows[start:start + batch_size].to(device)
            logits = forward_logits(model, batch, torch.ones_like(batch))
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll.double())
    tokens = windows.shape[0] * (window_length - 1)
    mean_nll = total_nll / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll, tokens=tokens,
                            windows=windows.shape[0], window_length=window_length)


def tokenize_text(tokenizer: object, text: str, min_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens.

    With ``min_tokens`` only a growing prefix of the text is tokenized until it yields more
    than that many tokens (a 4 MB book need not be tokenized for 16 windows); the last few
    tokens of a prefix are dropped because the cut may split a word.
    """
    def encode(piece: str) -> list[int]:
        return list(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])

    if min_tokens is None:
        return encode(text)
    chars = max(4096, min_tokens * 8)
    while chars < len(text):
        ids = encode(text[:chars])
        if len(ids) > min_tokens + 8:
            return ids[:-8]
        chars *= 2
    return encode(text)


def text_perplexity(model: object, tokenizer: object, text: str, *, window_length: int,
                    max_windows: int | None = None, spread: bool = False,
                    batch_size: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (see :func:`perplexity`), tokenized by
    ``tokenizer`` without special tokens."""
    needed = None if max_windows is None or spread else window_length * max_windows
    ids = tokenize_text(tokenizer, text, needed)
    return perplexity(model, ids, window_length=window_length, max_windows=max_windows,
                      spread=spread, batch_size=batch_size, progress=progress)
